"""Restore never discards a good checkpoint: what is set aside, and what stops the run."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest
from worker_env import fake_devices_env

from cavmae_jax.errors import UserError
from cavmae_jax.train.checkpoint import Checkpointer

WORKER = Path(__file__).with_name("checkpoint_worker.py")
PARAMS = {"w": jnp.ones((3, 4)), "b": jnp.zeros((4,))}


def state_of(tx) -> dict:
    return {"params": PARAMS, "opt_state": tx.init(PARAMS), "step": jnp.zeros((), jnp.int32)}


def saved(folder, steps=(2, 4)) -> Checkpointer:
    checkpointer = Checkpointer(folder, asynchronous=False)
    for step in steps:
        checkpointer.save(step, state_of(optax.adamw(1e-3)), {"config": {"clip_norm": 0.0}})
    return checkpointer


def listing(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_checkpoint_of_another_optimizer_chain_stops_in_one_line_and_touches_nothing(tmp_path):
    """A resume with gradient clipping added (the optimizer state gains a level): one line
    that names the arrays and the changed setting; every file is as it was."""
    checkpointer = saved(tmp_path)
    before = listing(tmp_path)
    clipped = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    with pytest.raises(UserError) as raised:
        checkpointer.restore_newest_readable(state_of(clipped), config={"clip_norm": 1.0})
    message = str(raised.value)
    assert "\n" not in message and f"{tmp_path}/4: saved from another state layout" in message
    assert "opt_state/0/count only in the checkpoint" in message
    assert "settings changed: clip_norm: 0.0 -> 1.0" in message
    assert listing(tmp_path) == before
    # the same layout still restores the newest step
    step, _ = checkpointer.restore_newest_readable(state_of(optax.adamw(1e-3)))
    assert step == 4


def test_a_restore_that_fails_for_another_reason_than_its_files_sets_nothing_aside(tmp_path):
    """Out of memory (or a network error) while restoring: the error goes up, the checkpoint
    stays where it is."""
    checkpointer = saved(tmp_path)
    before = listing(tmp_path)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")

    checkpointer.handlers["state"].restore = out_of_memory
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        checkpointer.restore_newest_readable(state_of(optax.adamw(1e-3)))
    assert listing(tmp_path) == before


def test_a_checkpoint_whose_data_does_not_read_is_set_aside_and_the_one_before_restores(
    tmp_path,
):
    """A data error (the newest checkpoint's largest file cut in half, as a full disk or a
    copy cut short leaves it; Orbax wraps TensorStore's error): named, moved aside to
    ``unreadable-4``, and step 2 restores."""
    weights = {"w": jax.random.normal(jax.random.key(0), (256, 512))}
    checkpointer = Checkpointer(tmp_path, asynchronous=False)
    for step in (2, 4):
        checkpointer.save(step, {"params": weights}, {})
    files = [p for p in (tmp_path / "4").rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    step, state = checkpointer.restore_newest_readable({"params": weights})
    assert step == 2 and (state["params"]["w"] == weights["w"]).all()
    assert (tmp_path / "unreadable-4").is_dir() and not (tmp_path / "4").exists()


@pytest.mark.parametrize("fault, resumed", [("unreadable", 2), ("stale", 4)])
def test_two_processes_resume_the_same_step_whatever_one_of_them_sees(tmp_path, fault, resumed):
    """A pod's hosts resume one step. Process 1's read of the newest checkpoint fails (a data
    error on its shards only): both resume step 2, and step 4 is set aside once. Process 1's
    listing lacks the newest step (a bucket listing not yet consistent): process 0's list
    decides, and both resume step 4."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(tmp_path), fault],
            env=fake_devices_env(
                1,
                CAVMAE_COORDINATOR=f"127.0.0.1:{port}",
                CAVMAE_PROCESSES="2",
                CAVMAE_PROCESS_ID=str(index),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-2000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert [r["step"] for r in results] == [resumed, resumed]
    assert all(r["values"] == [float(resumed)] for r in results)
    assert (tmp_path / "unreadable-4").is_dir() == (fault == "unreadable")
