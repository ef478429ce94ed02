"""Training runs in subprocesses, stopped by a signal once they have logged a given step."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pretrain_command(
    workdir, dataset, steps: int, *extra: str, config: str = "configs/demo.py"
) -> list[str]:
    """``cavmae pretrain`` of ``config`` (the demo model) on ``dataset`` for ``steps`` updates of
    4 clips, logging every update and checkpointing every 2."""
    return [
        sys.executable,
        "-m",
        "cavmae_jax.cli",
        "pretrain",
        "--config",
        config,
        "--workdir",
        str(workdir),
        f"--config.num_steps={steps}",
        "--config.log_every=1",
        "--config.checkpoint_every=2",
        "--config.batch_size=4",
        f"--config.data.dir={dataset}",
        *extra,
    ]


def logged_steps(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line]


def start_and_stop(command: list[str], workdir: Path, at_step: int, sig: int) -> subprocess.Popen:
    """Start ``command`` (a run in ``workdir``) and send ``sig`` once it has logged ``at_step``."""
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    deadline = time.monotonic() + 300
    while max(logged_steps(workdir), default=0) < at_step and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be stopped"
        time.sleep(0.01)
    process.send_signal(sig)
    process.wait(timeout=120)
    return process
