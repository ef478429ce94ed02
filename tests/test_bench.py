"""The GPU benchmark (``bench/gpu_suite.sh``) is prepared on this CPU: its step benchmark builds,
lowers and runs a recipe's own step, and its dry run builds everything and runs nothing."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_step_benchmark_runs_the_recipes_step_and_its_dry_run_runs_nothing():
    recipe_step = bench_module("recipe_step")
    tiny = [str(ROOT / "configs/finetune.py:as2m,tiny"), "--batch", "4"]
    dry = recipe_step.main([*tiny, "--dry-run"])
    assert dry["lowered"] and dry["batch"] == 4 and "clips_per_s" not in dry
    run = recipe_step.main([*tiny, "--steps", "2", "--peak-tflops", "0.5"])
    assert run["loss_finite"] and run["clips_per_s"] > 0 and run["step_ms"] > 0
    flops = run["clips_per_s"] * run["gflop_per_clip"] / 1e3
    assert run["tflops"] == pytest.approx(flops, rel=0.01)
    assert run["mfu"] == pytest.approx(run["tflops"] / 0.5, rel=0.01)  # one CPU device


def test_the_official_baseline_dry_run_builds_the_model_without_a_gpu():
    row = bench_module("torch_baseline").run_one("train", 48, 10, "cuda", dry_run=True)
    assert row["batch"] == 48 and row["trainable"] > 150e6  # the full-size model and decoder
    check = subprocess.run(["bash", "-n", str(ROOT / "bench/gpu_suite.sh")], capture_output=True)
    assert check.returncode == 0, check.stderr
