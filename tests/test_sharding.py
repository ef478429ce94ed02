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


def run_worker(shape: dict, rules: str, groups: int = 1) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    done = subprocess.run(
        [sys.executable, str(WORKER), json.dumps(shape), rules, str(groups)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def single():
    return run_worker({"data": 1}, "dp")


@pytest.mark.parametrize(
    "shape,rules",
    [({"data": 8}, "dp"), ({"data": 2, "fsdp": 4}, "fsdp"), ({"data": 4, "tensor": 2}, "tensor")],
)
def test_sharded_step_equals_single_device(single, shape, rules):
    sharded = run_worker(shape, rules)
    assert sharded["devices"] == 8
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-5)
    np.testing.assert_allclose(sharded["params"], single["params"], rtol=1e-4, atol=1e-5)
    if rules == "fsdp":
        assert "fsdp" in sharded["kernel_spec"] and sharded["moment_spec"] == sharded["kernel_spec"]
    if rules == "tensor":
        assert "tensor" in sharded["kernel_spec"]


def test_contrastive_groups_on_a_mesh_equal_the_single_device_groups():
    """G=4 groups of 2 on 8 devices: the same sum of quarter-batch losses as on one device."""
    one = run_worker({"data": 1}, "dp", groups=4)
    eight = run_worker({"data": 8}, "dp", groups=4)
    assert eight["loss_c"] == pytest.approx(one["loss_c"], rel=1e-5)
    assert eight["loss"] == pytest.approx(one["loss"], rel=1e-5)


def test_mesh_shapes_are_checked():
    import jax

    mesh = make_mesh({"data": -1})
    assert dict(mesh.shape) == {"data": len(jax.devices()), "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="does not fit"):
        make_mesh({"data": -1, "fsdp": 3})
    assert FSDP_RULES["embed"] == "fsdp"


def test_two_processes_match_one_process():
    """jax.distributed on 127.0.0.1: 2 processes x 2 devices = 1 process x 4 devices (3 steps)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    shape = json.dumps({"data": 2, "fsdp": 2})
    procs = []
    for pid in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   CAVMAE_COORDINATOR=f"127.0.0.1:{port}", CAVMAE_PROCESSES="2",
                   CAVMAE_PROCESS_ID=str(pid))  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, str(WORKER), shape, "fsdp", "1", "3"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))  # fmt: skip
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-2000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    done = subprocess.run([sys.executable, str(WORKER), shape, "fsdp", "1", "3"], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    single = json.loads(done.stdout.strip().splitlines()[-1])
    for result in results:
        assert result["devices"] == 4
        assert result["loss"] == pytest.approx(single["loss"], rel=1e-5)
        np.testing.assert_allclose(result["params"], single["params"], rtol=1e-4, atol=1e-5)
