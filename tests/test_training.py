"""The pretraining loop: killed and restarted runs end where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from runs import ROOT, logged_steps, start_and_stop

from cavmae_jax import convert
from input_pipeline import prepare, synthetic

STEPS = 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    clips = synthetic.generate(root / "videos", clips=12, classes=4, seed=4)
    prepare.prepare(clips, root / "ds", labels=root / "videos" / "labels.csv", progress=False)
    return root / "ds"


def command(workdir: Path, dataset: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cavmae_jax.cli",
        "pretrain",
        "--config",
        "configs/demo.py",
        "--workdir",
        str(workdir),
        f"--config.num_steps={STEPS}",
        "--config.log_every=1",
        "--config.checkpoint_every=2",
        "--config.batch_size=4",
        f"--config.data.dir={dataset}",
        "--config.data.generate=False",
    ]


def final_parameters(workdir: Path) -> dict[str, np.ndarray]:
    return convert.to_torch_state_dict(convert.load_checkpoint(workdir / "model"))


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    subprocess.run(command(workdir, dataset), cwd=ROOT, check=True, capture_output=True)
    assert logged_steps(workdir) == list(range(1, STEPS + 1))
    return final_parameters(workdir)


def test_killed_and_preempted_runs_end_with_the_same_parameters(dataset, uninterrupted, tmp_path):
    """One workdir, three interruptions: SIGKILL after step 2 (losing the steps since the last
    checkpoint), SIGTERM after step 4 (saves where it stands, exits 0), SIGKILL after step 6."""
    start_and_stop(command(tmp_path, dataset), tmp_path, 2, signal.SIGKILL)
    process = start_and_stop(command(tmp_path, dataset), tmp_path, 4, signal.SIGTERM)
    assert process.returncode == 0
    saved = int(process.stdout.read().split("SIGTERM: saved step ")[1].split(",")[0])
    assert saved >= 4 and (tmp_path / "checkpoints" / str(saved)).is_dir()
    start_and_stop(command(tmp_path, dataset), tmp_path, 6, signal.SIGKILL)
    assert not (tmp_path / "model").exists()
    subprocess.run(command(tmp_path, dataset), cwd=ROOT, check=True, capture_output=True)
    assert logged_steps(tmp_path) == list(range(1, STEPS + 1))
    resumed = final_parameters(tmp_path)
    for name, value in uninterrupted.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)


def test_demo_pretraining_learns_audio_visual_correspondence(tmp_path):
    """Fixed seeds, 48 generated clips of 8 classes, 150 updates (50 epochs of 3, at the demo's
    first learning rate): recall@1 well above chance. Compiled as a user's run is (without the
    suite's XLA_FLAGS)."""
    env = {name: value for name, value in os.environ.items() if name != "XLA_FLAGS"}
    cavmae = [sys.executable, "-m", "cavmae_jax.cli"]
    subprocess.run(
        [
            *cavmae,
            "pretrain",
            "--config",
            "configs/demo.py",
            "--workdir",
            str(tmp_path),
            "--config.data.clips=48",
            "--config.epochs=50",
            "--config.lr_decay_start=50",
            "--config.data.workers=1",
        ],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    done = subprocess.run(
        [*cavmae, "retrieval", "--workdir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(done.stdout.splitlines()[0])
    assert result["clips"] == 48
    assert result["a2v_r1"] >= 4 * result["chance_r1"]
    assert result["v2a_r1"] >= 4 * result["chance_r1"]
    assert (tmp_path / "loss.png").stat().st_size > 10_000
