"""Where the time of one full-size pretraining step goes: per-op timings from the JAX profiler.

Traces one compiled step and prints the time per XLA op kind (fusions grouped by name) and the
slowest single ops with the shape they produce, so a slow kernel can be found in the HLO dump
(``XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text``).

    python bench/profile_step.py --batch 2
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import tempfile
from pathlib import Path

import jax
from model_throughput import full_size_pretraining  # same folder: run as a script

RUNTIME_EVENTS = ("ThunkExecutor", "$", "Slinky", "Pjit", "end:", "Common", "Parse", "Handle")


def op_times(trace_dir: Path) -> collections.Counter:
    """Microseconds per op name in the newest trace under ``trace_dir``."""
    trace = sorted(trace_dir.rglob("*.trace.json.gz"))[-1]
    events = json.load(gzip.open(trace))["traceEvents"]
    times: collections.Counter = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and not event["name"].startswith(RUNTIME_EVENTS):
            times[event["name"]] += event["dur"]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    *_, state, step, batch = full_size_pretraining(args.dtype, args.batch)
    for _ in range(2):  # warm-up (compiles)
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        times = op_times(Path(trace_dir))
    compiled = step.lower(state, batch).compile()
    shapes = dict(re.findall(r"%([\w.\-]+) = (\w+\[[\d,]*\])", compiled.as_text()))
    kinds: collections.Counter = collections.Counter()
    for name, us in times.items():
        kinds[re.sub(r"\.\d+$", "", name)] += us
    total = sum(times.values())
    print(f"batch {args.batch} {args.dtype}: {total / 1e3:.0f} ms in XLA ops")
    for kind, us in kinds.most_common(12):
        print(f"{us / 1e3:9.1f} ms {100 * us / total:5.1f}%  {kind}")
    print(f"-- slowest {args.top} ops")
    for name, us in times.most_common(args.top):
        print(f"{us / 1e3:9.1f} ms  {name:40s} {shapes.get(name, '')}")


if __name__ == "__main__":
    main()
