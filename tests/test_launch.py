"""Launch helpers: the ahead-of-time compile check on stand-in devices."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def aot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "launch/aot_check.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_aot_check_compiles_sharded_recipes_of_every_trainer_and_rejects_bad_batches():
    done = aot(
        "configs/finetune.py:as20k,tiny",
        "--devices",
        "8",
        "--config.mesh.fsdp=4",
        "--config.sharding=fsdp",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and report["global_batch"] == 8
    assert report["arguments_gib_per_device"] > 0 and report["tflop_per_step_per_device"] > 0
    pcav = aot("configs/pcav.py:as,tiny", "--devices", "8", "--config.grad_accum=2")
    assert pcav.returncode == 0, pcav.stderr[-2000:]
    report = json.loads(pcav.stdout.strip().splitlines()[-1])
    assert report["trainer"] == "pcav" and report["grad_accum"] == 2
    assert report["attention"] == "recompute"  # auto, resolved for the mesh's CPU devices
    bad = aot("configs/pretrain.py:as-base,tiny", "--devices", "8", "--config.batch_size=12")
    assert bad.returncode != 0
    assert "global batch 12 does not split over 8 batch shards" in bad.stderr
