"""The pretraining loop: killed and restarted runs end where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from runs import ROOT, logged_steps, pretrain_command, start_and_stop
from worker_env import fake_devices_env

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
    return pretrain_command(workdir, dataset, STEPS)


def final_parameters(workdir: Path) -> dict[str, np.ndarray]:
    return convert.to_torch_state_dict(convert.load_model(workdir / "model"))


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


def test_an_unreadable_newest_checkpoint_is_named_and_the_one_before_resumes(
    dataset, uninterrupted, tmp_path
):
    """A resume with a flag that changes the state's layout (gradient clipping wraps the
    optimizer state) stops in one line naming the setting, and leaves the checkpoints and the
    metrics as they were. The newest checkpoint's largest file truncated (a disk filled, a
    copy cut short): the restart names it and why, sets it aside, resumes from the previous
    one and ends as the uninterrupted run. A checkpoint asked for by hand that does not exist
    is named."""
    start_and_stop(command(tmp_path, dataset), tmp_path, 4, signal.SIGTERM)
    folder = tmp_path / "checkpoints"
    kept = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "data" not in p.parts}
    changed = subprocess.run(
        command(tmp_path, dataset) + ["--config.clip_norm=1.0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert changed.returncode == 2 and len(changed.stderr.strip().splitlines()) == 1
    assert "saved from another state layout" in changed.stderr
    assert "clip_norm: 0.0 -> 1.0" in changed.stderr
    assert {p: p.read_bytes() for p in kept} == kept
    assert sorted(
        p for p in tmp_path.rglob("*") if p.is_file() and "data" not in p.parts
    ) == sorted(kept)
    steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    assert len(steps) >= 2
    files = [p for p in (folder / str(steps[-1])).rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    missing = subprocess.run(
        command(tmp_path, dataset) + ["--config.restore_step=999"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "no checkpoint of step 999" in missing.stderr
    done = subprocess.run(command(tmp_path, dataset), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"checkpoints/{steps[-1]}: unreadable checkpoint (" in done.stdout
    assert (folder / f"unreadable-{steps[-1]}").is_dir()
    assert logged_steps(tmp_path) == list(range(1, STEPS + 1))
    resumed = final_parameters(tmp_path)
    for name, value in uninterrupted.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)


def two_processes(workdir: Path, dataset: Path) -> list[subprocess.Popen]:
    """The run as two processes (one CPU device each) joined by ``jax.distributed``."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    joined = ["--coordinator", f"localhost:{port}", "--num-processes", "2"]
    return [
        subprocess.Popen(
            command(workdir, dataset) + joined + ["--process-id", str(i)],
            cwd=ROOT,
            env=fake_devices_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


def finished(processes: list[subprocess.Popen]) -> list[str]:
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-2000:]
    return [out for out, _ in outputs]


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_saved_step(dataset, tmp_path):
    """A pod host is preempted: SIGTERM reaches process 1 only. JAX's preemption service makes
    both agree on one step; both save it, print it and exit 0; the restarted pair resumes
    there and ends with the parameters of an uninterrupted two-process run."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    finished(two_processes(straight, dataset))
    processes = two_processes(stopped, dataset)
    deadline = time.monotonic() + 300
    while max(logged_steps(stopped), default=0) < 2 and time.monotonic() < deadline:
        assert all(p.poll() is None for p in processes), "the run ended before the signal"
        time.sleep(0.01)
    processes[1].send_signal(signal.SIGTERM)
    outputs = finished(processes)
    saved = {int(out.split("SIGTERM: saved step ")[1].split(",")[0]) for out in outputs}
    assert len(saved) == 1 and 2 <= min(saved) < STEPS, outputs
    assert (stopped / "checkpoints" / str(saved.pop())).is_dir()
    assert not (stopped / "model").exists()
    finished(two_processes(stopped, dataset))
    assert logged_steps(stopped) == list(range(1, STEPS + 1))
    resumed, expected = final_parameters(stopped), final_parameters(straight)
    for name, value in expected.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)


def test_demo_pretraining_learns_audio_visual_correspondence(tmp_path):
    """Fixed seeds, 48 generated clips of 8 classes, 150 updates (50 epochs of 3, at the demo's
    first learning rate): recall@1 well above chance. Compiled as a user's run is (without the
    suite's XLA_FLAGS)."""
    env = {name: value for name, value in os.environ.items() if name != "XLA_FLAGS"}
    cavmae = [sys.executable, "-m", "cavmae_jax.cli"]
    data = tmp_path / "data"
    subprocess.run([*cavmae, "prepare", "--demo", "48", "--output", str(data)], check=True)
    subprocess.run(
        [
            *cavmae,
            "pretrain",
            "--config",
            "configs/demo.py",
            "--workdir",
            str(tmp_path),
            f"--config.data.dir={data}",
            "--config.epochs=50",
            "--config.lr_decay_start=50",
        ],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    retrieval = [*cavmae, "retrieval", "--model", str(tmp_path / "model")]
    retrieval += ["--data", str(data)]
    # the evaluation split by default: the demo's dataset has only its training split
    default = subprocess.run(retrieval, cwd=ROOT, env=env, capture_output=True, text=True)
    assert default.returncode == 2 and "no split 'eval' (it has train)" in default.stderr
    done = subprocess.run(
        [*retrieval, "--split", "train"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(done.stdout.splitlines()[0])
    assert "WARNING" not in done.stderr and "deprecated" not in done.stderr
    assert result["clips"] == 48
    assert result["a2v_r1"] >= 4 * result["chance_r1"]
    assert result["v2a_r1"] >= 4 * result["chance_r1"]
    assert (tmp_path / "loss.png").stat().st_size > 10_000
