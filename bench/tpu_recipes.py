"""Every official recipe compiled for TPU slices from this machine: the table of docs/tpu.md.

Each row is one ``launch/aot_check.py CONFIG --topology NAME`` (a fresh process: libtpu's
compile-only devices), run two at a time; the JSON reports go to ``--output`` (JSON lines) and
the Markdown table is printed, each row with the command that reproduces it.

    python bench/tpu_recipes.py --output docs/tpu_results.jsonl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = [  # (config, topology, overrides): the recipe's global batch on slices it splits over
    ("configs/pretrain.py:as-base", "v5e-8", ()),
    ("configs/pretrain.py:as-base", "v5p-8", ()),
    ("configs/pretrain.py:as-base", "v5p-8", ("--config.model.attention=xla",)),
    ("configs/pretrain.py:as-base", "v6e-8", ()),
    ("configs/pretrain.py:as-scale+", "v5e-8", ()),
    ("configs/pretrain.py:as-scale+", "v5p-8", ()),
    ("configs/pretrain.py:as-scale++", "v5e-8", ()),
    ("configs/pretrain.py:as-scale++", "v5e-16", ()),
    ("configs/pretrain.py:as-scale++", "v5e-16", ("--config.model.attention=xla",)),
    ("configs/pretrain.py:as-scale++", "v5p-64", ()),
    ("configs/pretrain.py:as-scale++", "2x v5p-64", ()),
    ("configs/pretrain.py:as-scale++", "v6e-256", ()),
    # one clip per chip: FSDP within each 16-chip row of the torus, data parallel across rows
    (
        "configs/pretrain.py:as-scale++",
        "v6e-256",
        ("--config.mesh.data=16", "--config.mesh.fsdp=16"),
    ),
    ("configs/pretrain.py:vgg", "v6e-8", ()),
    ("configs/pcav.py:as", "v5p-8", ()),
    ("configs/pcav.py:as", "v5e-16", ()),
    ("configs/finetune.py:as20k", "v5p-8", ()),
    ("configs/finetune.py:as2m", "v5e-8", ()),
    ("configs/finetune.py:vgg", "v6e-8", ()),
]


def command(config: str, topology: str, overrides: tuple[str, ...]) -> list[str]:
    return ["python", "launch/aot_check.py", config, "--topology", topology, *overrides]


def check(row) -> dict:
    args = command(*row)
    done = subprocess.run(
        [sys.executable, *args[1:]], cwd=ROOT, capture_output=True, text=True, timeout=3600
    )
    if done.returncode:
        return {"config": row[0], "topology": row[1], "error": done.stderr.strip()[-300:]}
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["command"] = " ".join(f'"{a}"' if " " in a else a for a in args)
    return report


def verdict(report: dict) -> str:
    """yes / no for the whole run, and the part that needs most memory when it is not the step."""
    said = "yes" if report["fits"] else "**no**"
    part = report.get("run_peak_part", "training step")
    return said if part == "training step" else f"{said} ({part}: {report['run_peak_gib']})"


def markdown(reports: list[dict]) -> str:
    head = (
        "| recipe | slice | mesh | attention, MLP | per chip: state, temporaries, peak / HBM (GiB) "
        "| fits | TFLOP per chip, compiled / analytic | collectives per step | matmul ms at "
        "peak (clips/s bound); memory-traffic ms, all buffers / HBM-resident only; MFU bound, both "
        "ways | command |\n|" + "---|" * 10
    )
    lines = [head]
    for r in reports:
        name = r["config"].removeprefix("configs/").replace(".py", "")
        if "error" in r:
            lines.append(f"| {name} | {r['topology']} | | | error: {r['error']} | | | | | |")
            continue
        mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1)
        if "compile_error" in r:
            memory, flops, collectives, roofline = r["compile_error"][:120], "", "", ""
        else:
            memory = (
                f"{r['arguments_gib']}, {r['temporaries_gib']}, {r['peak_gib']} / {r['hbm_gib']}"
            )
            flops = f"{r['tflop_per_chip_compiled']} / {r['tflop_per_chip_analytic']}"
            collectives = ", ".join(
                f"{kind} {c['count']} ({c['gib']} GiB)" for kind, c in r["collectives"].items()
            )
            ms = r["roofline_ms"]
            roofline = (
                f"{ms['compute']} ({r['clips_per_s_bound']:.0f}); {ms['hbm']} / {ms['hbm_only']}; "
                f"{r['roofline_mfu_bound']} / {r['roofline_mfu_bound_hbm_only']}"
            )
        lines.append(
            f"| {name} (batch {r['global_batch']}"
            + (f", {r['grad_accum']} micro-batches" if r["grad_accum"] > 1 else "")
            + f") | {r['topology']} | {mesh} | {r['attention']}, {r['mlp']} | {memory} | "
            f"{verdict(r)} | {flops} | {collectives} | {roofline} | "
            f"`{r['command']}` |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="docs/tpu_results.jsonl")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--table-only", action="store_true", help="render --output, compile nothing"
    )
    args = parser.parse_args()
    results = ROOT / args.output
    if not args.table_only:
        with ThreadPoolExecutor(args.workers) as pool:
            reports = list(pool.map(check, ROWS))
        results.write_text("".join(json.dumps(r) + "\n" for r in reports))
    print(markdown([json.loads(line) for line in results.read_text().splitlines()]))


if __name__ == "__main__":
    main()
