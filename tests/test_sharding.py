"""Pretraining steps on 8 fake CPU devices (DP, FSDP, tensor) and on two processes equal the
steps on one device."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from worker_env import fake_devices_env

from cavmae_jax.sharding import FSDP_RULES, make_mesh

WORKER = Path(__file__).with_name("mesh_worker.py")
# every run: 3 SGD steps on the same batch of 8 clips. Data parallel runs with G=4 contrastive
# groups (compared with G=4 on one device), FSDP and tensor with the whole-batch negatives (G=1).
RUNS = {
    "single": {"shape": {"data": 1}, "rules": "dp"},
    "single_groups": {"shape": {"data": 1}, "rules": "dp", "groups": 4},
    "dp": {"shape": {"data": 8}, "rules": "dp", "groups": 4},
    "fsdp": {"shape": {"data": 2, "fsdp": 4}, "rules": "fsdp"},
    "tensor": {"shape": {"data": 4, "tensor": 2}, "rules": "tensor"},
    # 2 micro-batches of 4, the contrastive loss over all 8 clips (gradient caching): the
    # single device's whole batch; with FSDP the weights are gathered once per update, outside
    # the micro-batch loop
    "fsdp_accum": {"shape": {"fsdp": 8}, "rules": "fsdp", "accum": 2},
}
TWO_HOST_RUN = {"shape": {"data": 2, "fsdp": 2}, "rules": "fsdp", "steps": 3}


def run_worker(runs: list[dict], devices: int, **extra_env: str) -> subprocess.Popen:
    env = fake_devices_env(devices, **extra_env)
    return subprocess.Popen(
        [sys.executable, str(WORKER), json.dumps(runs)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def results_of(process: subprocess.Popen) -> list[dict]:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs() -> dict:
    """Every single-process run in one 8-device worker (one start-up, not seven)."""
    specs = [dict(spec, steps=3) for spec in RUNS.values()]
    return dict(zip(RUNS, results_of(run_worker(specs, 8)), strict=True))


@pytest.mark.parametrize("name", ["dp", "fsdp", "tensor", "fsdp_accum"])
def test_sharded_steps_equal_single_device_steps(runs, name):
    sharded = runs[name]
    single = runs["single_groups" if RUNS[name].get("groups") else "single"]
    assert sharded["devices"] == 8 and single["devices"] == 1
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert sharded["loss_c"] == pytest.approx(single["loss_c"], rel=1e-5)
    np.testing.assert_allclose(sharded["params"], single["params"], rtol=1e-4, atol=1e-5)
    if name.startswith("fsdp"):
        assert "fsdp" in sharded["kernel_spec"] and sharded["moment_spec"] == sharded["kernel_spec"]
    if name == "tensor":
        assert "tensor" in sharded["kernel_spec"]


def test_contrastive_groups_change_the_loss(runs):
    """G=4 (negatives within quarter batches, as the official 4-GPU DataParallel) is not G=1:
    the data-parallel comparison above would not notice groups being ignored otherwise."""
    assert runs["single_groups"]["loss_c"] != pytest.approx(runs["single"]["loss_c"], rel=1e-3)


def test_mesh_shapes_are_checked():
    import jax

    mesh = make_mesh({"data": -1})
    assert dict(mesh.shape) == {"slice": 1, "data": len(jax.devices()), "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="does not fit"):
        make_mesh({"data": -1, "fsdp": 3})
    assert FSDP_RULES["embed"] == "fsdp"


def test_two_processes_match_one_device(runs):
    """jax.distributed on 127.0.0.1: 2 processes x 2 devices (data 2 x fsdp 2), 3 steps, end
    where one device ends."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    hosts = [
        run_worker(
            [TWO_HOST_RUN],
            2,
            CAVMAE_COORDINATOR=f"127.0.0.1:{port}",
            CAVMAE_PROCESSES="2",
            CAVMAE_PROCESS_ID=str(pid),
        )
        for pid in range(2)
    ]
    single = runs["single"]
    for (result,) in [results_of(p) for p in hosts]:
        assert result["devices"] == 4
        assert result["loss"] == pytest.approx(single["loss"], rel=1e-5)
        np.testing.assert_allclose(result["params"], single["params"], rtol=1e-4, atol=1e-5)
