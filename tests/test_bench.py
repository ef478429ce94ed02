"""The GPU benchmark (``bench/gpu_suite.sh``) is prepared on this CPU: its step benchmark builds,
lowers and runs a recipe's own step, and its dry run builds everything and runs nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str) -> list[dict]:
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_the_step_benchmark_runs_the_recipes_step_and_its_dry_run_runs_nothing():
    tiny = ["bench/recipe_step.py", "configs/finetune.py:as2m,tiny", "--batch", "4"]
    (dry,) = bench(*tiny, "--dry-run")
    assert dry["lowered"] and dry["batch"] == 4 and "clips_per_s" not in dry
    (run,) = bench(*tiny, "--steps", "2", "--peak-tflops", "0.5")
    assert run["loss_finite"] and run["clips_per_s"] > 0 and run["step_ms"] > 0
    flops = run["clips_per_s"] * run["gflop_per_clip"] / 1e3
    assert run["tflops"] == pytest.approx(flops, rel=0.01)
    assert run["mfu"] == pytest.approx(run["tflops"] / 0.5, rel=0.01)  # one CPU device


def test_the_official_baseline_dry_run_builds_the_model_without_a_gpu():
    script = "bench/torch_baseline.py"
    (row,) = bench(script, "--device", "cuda", "--modes", "train", "--batches", "48", "--dry-run")
    assert row["batch"] == 48 and row["trainable"] > 150e6  # the full-size model and decoder
    check = subprocess.run(["bash", "-n", str(ROOT / "bench/gpu_suite.sh")], capture_output=True)
    assert check.returncode == 0, check.stderr
