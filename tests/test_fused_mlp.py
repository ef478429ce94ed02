"""The fused MLP kernels of TPUs (on Pallas's TPU interpreter here) against XLA's MLP."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu
from worker_env import fake_devices_env

from cavmae_jax.models import fused_mlp
from cavmae_jax.models.layers import Mlp

# 6 x 177 tokens: the last 256-token tile runs past the end, so its extra rows are exercised
SHAPE, DIM, HIDDEN = (6, 177), 128, 512


def outputs_and_gradients(implementation: str, x: jax.Array, probe: jax.Array, dtype=None):
    """The module's output and the gradients of <output, probe> for x and every parameter."""
    module = Mlp(DIM, HIDDEN, nnx.Rngs(0), dtype, implementation=implementation)
    graphdef, params = nnx.split(module)

    def loss(params, x):
        out = nnx.merge(graphdef, params)(x)
        return jnp.sum(out.astype(jnp.float32) * probe), out

    with pltpu.force_tpu_interpret_mode():
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return out, grads


def random_inputs(seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 2)
    return jax.random.normal(keys[0], (*SHAPE, DIM)), jax.random.normal(keys[1], (*SHAPE, DIM))


def test_the_fused_kernels_equal_xlas_mlp_forward_and_backward():
    """fc1, exact GELU and fc2 in one kernel each way give the module's output and the
    gradients of the input, both weights and both biases, as XLA does in float32."""
    x, probe = random_inputs()
    want_out, want_grads = outputs_and_gradients("xla", x, probe)
    got_out, got_grads = outputs_and_gradients("fused", x, probe)
    np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-5)


def test_the_fused_kernels_in_bfloat16_stay_near_float32():
    """What a TPU runs: bfloat16 tokens and weights, float32 hidden state and accumulation in
    the kernels. Output and gradients stay within bfloat16's resolution of float32."""
    x, probe = random_inputs(1)
    exact_out, exact = outputs_and_gradients("fused", x, probe)
    low_out, low = outputs_and_gradients("fused", x.astype(jnp.bfloat16), probe, jnp.bfloat16)
    assert low_out.dtype == jnp.bfloat16
    pairs = [(low_out, exact_out), *zip(jax.tree.leaves(low), jax.tree.leaves(exact), strict=True)]
    for got, want in pairs:
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


def test_the_fused_mlp_is_chosen_on_tpus_where_its_widths_fit():
    assert fused_mlp.resolve("auto", "tpu") == "fused"
    assert fused_mlp.resolve("auto", "cpu") == fused_mlp.resolve("auto", "gpu") == "xla"
    with pytest.raises(ValueError, match="needs a TPU"):
        fused_mlp.resolve("fused", "gpu")
    assert fused_mlp.fits(768, 3072, 1024) and fused_mlp.fits(512, 2048, 8496)
    assert not fused_mlp.fits(64, 256, 4096)  # narrower than a 128-lane column
    assert not fused_mlp.fits(768, 3072, 708)  # too few tokens per device to pay
    assert not Mlp(64, 256, nnx.Rngs(0), implementation="fused")._fused((8, 512, 64))
    module = Mlp(128, 512, nnx.Rngs(0), implementation="fused")
    assert module._fused((2, 512, 128)) and not module._fused((1, 512, 128))


MESH_PROGRAM = """
import functools, json, jax, jax.numpy as jnp, numpy as np
from jax.experimental import pallas as pl
from jax.sharding import NamedSharding, PartitionSpec as P
from cavmae_jax.models import fused_mlp
# Pallas's generic interpreter (plain JAX operations): the TPU interpreter's callbacks stall
# when several devices run it at once
fused_mlp.pl.pallas_call = functools.partial(pl.pallas_call, interpret=True)
keys = jax.random.split(jax.random.key(3), 6)
x = jax.random.normal(keys[0], (4, 60, 128))
probe = jax.random.normal(keys[1], (4, 60, 128))
weights = (jax.random.normal(keys[2], (128, 512)) * 0.1, jax.random.normal(keys[3], (512,)),
           jax.random.normal(keys[4], (512, 128)) * 0.1, jax.random.normal(keys[5], (128,)))
def loss(x, *weights):
    return jnp.sum(fused_mlp.mlp(x, *weights) * probe)
grad = jax.jit(jax.grad(loss, argnums=range(5)))
results = []
mesh = jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
results.append(grad(x, *weights))
batch = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    results.append(grad(batch, *weights))
print(json.dumps([[np.asarray(g).tolist() for g in r] for r in results]))
"""


def test_under_a_mesh_each_device_runs_its_clips_and_the_weight_gradients_are_summed():
    """Four devices, one clip each: the kernels run per device (``shard_map``) and the weight
    and bias gradients of the four add up to the one-device gradients."""
    done = subprocess.run(
        [sys.executable, "-c", MESH_PROGRAM],
        env=fake_devices_env(4),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    single, sharded = json.loads(done.stdout.strip().splitlines()[-1])
    for got, want in zip(sharded, single, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-5)
