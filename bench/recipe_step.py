"""A recipe's own training step at full size on this host's accelerator: clips/s, MFU, memory.

The step is the one the trainers compile (``train/setup.py``: model, optimizer, sharding, the
recipe's dtype, attention and remat as resolved for this backend), on one batch resident on the
devices. The state is random in the recipe's shapes: the speed of a step does not depend on
the values, and no dataset or checkpoint is needed. MFU is the analytic FLOPs of the clips
(``cavmae_jax/flops.py``) per second over ``--peak-tflops`` per device (the chip's dense bf16
peak: 989 on an H100 or H200).

    python bench/recipe_step.py configs/pretrain.py:as-base --batch 48 --peak-tflops 989
    python bench/recipe_step.py configs/finetune.py:as2m --batch 48 --config.model.remat=matmuls
    python bench/recipe_step.py configs/pretrain.py:as-base --batch 256 --dry-run

``--dry-run`` builds the run and lowers its step, and compiles and runs nothing. The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from cavmae_jax.config_loading import apply_overrides, load_config
from cavmae_jax.train.setup import abstract_batch, build
from cavmae_jax.train.steps import TrainStep

NOMINAL_CLIPS = 100_000  # durations only: every dataset size compiles the same step
GIB = 2**30


def figure(value: float) -> float:
    """Four significant digits."""
    return float(f"{value:.4g}")


def random_like(tree, seed: int):
    """Arrays of the tree's shapes, dtypes and shardings: floats |N(0, 0.02)| (so that Adam's
    second moments are non-negative), integers zero."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def fill(leaf, key):
        make = jax.jit(
            lambda k: (
                0.02 * jnp.abs(jax.random.normal(k, leaf.shape, leaf.dtype))
                if jnp.issubdtype(leaf.dtype, jnp.floating)
                else jnp.zeros(leaf.shape, leaf.dtype)
            ),
            out_shardings=leaf.sharding,
        )
        return make(key)

    return jax.tree.unflatten(
        treedef, [fill(leaf, key) for leaf, key in zip(leaves, keys, strict=True)]
    )


def peak_memory_gib() -> float | None:
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
    return round(max(peaks) / GIB, 2) if peaks else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="config file[:variant]")
    parser.add_argument("--batch", type=int, help="global batch (default: the recipe's)")
    parser.add_argument("--steps", type=int, default=10, help="timed updates (median reported)")
    parser.add_argument("--peak-tflops", type=float, help="dense peak per device, for MFU")
    parser.add_argument("--dry-run", action="store_true", help="build and lower only")
    args, overrides = parser.parse_known_args(argv)
    config = load_config(args.config)
    apply_overrides(config, overrides)
    if args.batch:
        config.batch_size = args.batch
    setup, state = build(config, abstract_clips=NOMINAL_CLIPS)
    batch = abstract_batch(config, setup)
    step = setup.step_at(1)
    lowered = step.lower(state, batch)
    report = {
        "config": args.config,
        "devices": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
        "dtype": setup.cfg.dtype,
        "attention": setup.cfg.attention,
        "remat": setup.cfg.remat,
        "batch": config.batch_size,
        "gflop_per_clip": figure(setup.flops_at(1) / 1e9),
    }
    if args.dry_run:
        report["lowered"] = bool(lowered.as_text())
        print(json.dumps(report))
        return report
    started = time.perf_counter()
    compiled = TrainStep(lowered.compile())  # the step lowered above, not lowered again
    report["compile_s"] = round(time.perf_counter() - started, 1)
    state, data = random_like(state, 0), random_like(batch, 1)
    times = []
    for _ in range(2 + args.steps):  # two warm-up updates
        started = time.perf_counter()
        state, metrics = compiled(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - started)
    seconds = float(np.median(times[2:]))
    clips_per_s = config.batch_size / seconds
    report.update(
        step_ms=figure(seconds * 1e3),
        clips_per_s=figure(clips_per_s),
        tflops=figure(clips_per_s * setup.flops_at(1) / 1e12),
        loss_finite=bool(np.isfinite(float(metrics["loss"]))),
        peak_memory_gib=peak_memory_gib(),
    )
    if args.peak_tflops:
        report["mfu"] = figure(report["tflops"] / (args.peak_tflops * jax.device_count()))
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
