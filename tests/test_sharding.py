"""One pretraining step on 8 fake CPU devices equals the single-device step (DP, FSDP, tensor)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cavmae_jax.train.sharding import FSDP_RULES, make_mesh

WORKER = Path(__file__).with_name("mesh_worker.py")
TWO_HOST_RUN = {"shape": {"data": 2, "fsdp": 2}, "rules": "fsdp", "steps": 3}
SHARDED = [
    ({"data": 8}, "dp"),
    ({"data": 2, "fsdp": 4}, "fsdp"),
    ({"data": 4, "tensor": 2}, "tensor"),
]


def run_worker(runs: list[dict], devices: int, extra_env=None) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               **(extra_env or {}))  # fmt: skip
    return subprocess.Popen([sys.executable, str(WORKER), json.dumps(runs)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def results_of(process: subprocess.Popen) -> list[dict]:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs() -> dict:
    """Every single-process configuration in one 8-device worker (one start-up, not seven)."""
    specs = {"single": {"shape": {"data": 1}, "rules": "dp"},
             "single_groups": {"shape": {"data": 1}, "rules": "dp", "groups": 4},
             "eight_groups": {"shape": {"data": 8}, "rules": "dp", "groups": 4},
             "two_host_reference": TWO_HOST_RUN}  # fmt: skip
    specs.update({rules: {"shape": shape, "rules": rules} for shape, rules in SHARDED})
    results = results_of(run_worker(list(specs.values()), 8))
    return dict(zip(specs, results, strict=True))


@pytest.mark.parametrize("shape,rules", SHARDED)
def test_sharded_step_equals_single_device(runs, shape, rules):
    sharded, single = runs[rules], runs["single"]
    assert sharded["devices"] == 8 and single["devices"] == 1
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-5)
    np.testing.assert_allclose(sharded["params"], single["params"], rtol=1e-4, atol=1e-5)
    if rules == "fsdp":
        assert "fsdp" in sharded["kernel_spec"] and sharded["moment_spec"] == sharded["kernel_spec"]
    if rules == "tensor":
        assert "tensor" in sharded["kernel_spec"]


def test_contrastive_groups_on_a_mesh_equal_the_single_device_groups(runs):
    """G=4 groups of 2 on 8 devices: the same sum of quarter-batch losses as on one device."""
    one, eight = runs["single_groups"], runs["eight_groups"]
    assert eight["loss_c"] == pytest.approx(one["loss_c"], rel=1e-5)
    assert eight["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert one["loss_c"] != pytest.approx(runs["single"]["loss_c"], rel=1e-3)


def test_mesh_shapes_are_checked():
    import jax

    mesh = make_mesh({"data": -1})
    assert dict(mesh.shape) == {"data": len(jax.devices()), "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="does not fit"):
        make_mesh({"data": -1, "fsdp": 3})
    assert FSDP_RULES["embed"] == "fsdp"


def test_two_processes_match_one_process(runs):
    """jax.distributed on 127.0.0.1: 2 processes x 2 devices = 1 process x 4 devices (3 steps)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    hosts = [run_worker([TWO_HOST_RUN], 2, dict(CAVMAE_COORDINATOR=f"127.0.0.1:{port}",
                                                CAVMAE_PROCESSES="2", CAVMAE_PROCESS_ID=str(pid)))
             for pid in range(2)]  # fmt: skip
    single = runs["two_host_reference"]
    for (result,) in [results_of(p) for p in hosts]:
        assert result["devices"] == 4
        assert result["loss"] == pytest.approx(single["loss"], rel=1e-5)
        np.testing.assert_allclose(result["params"], single["params"], rtol=1e-4, atol=1e-5)
