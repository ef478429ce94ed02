"""The attention implementations equal jax.nn.dot_product_attention, each in its layout: the
recomputing kernel tokens-first [B, N, H, hd] as jax.nn, flash and splash heads-first
[B, H, N, hd], the grouped kernel the qkv projection's output in 128-lane groups."""

from __future__ import annotations

from contextlib import nullcontext

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cavmae_jax.models.attention import recomputing_attention


def inputs(dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, (2, 3, 7, 4), dtype) * 2 for key in keys[:3])
    return q, k, v, jax.random.normal(keys[3], (2, 3, 7, 4), dtype)


def reference(q, k, v, scale):
    return jax.nn.dot_product_attention(q, k, v, scale=scale)


def heads_first_reference(q, k, v, scale):
    """``reference`` on [B, H, N, hd] arrays."""
    out = reference(*(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), scale)
    return jnp.swapaxes(out, 1, 2)


def test_values_and_gradients_match_the_reference():
    q, k, v, probe = inputs()

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * probe)

    ours = jax.value_and_grad(loss(lambda q, k, v: recomputing_attention(q, k, v, 0.5)), (0, 1, 2))
    ref = jax.value_and_grad(loss(lambda q, k, v: reference(q, k, v, 0.5)), (0, 1, 2))
    (value, grads), (ref_value, ref_grads) = ours(q, k, v), ref(q, k, v)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)


def test_matches_numpy_softmax_attention():
    q, k, v, _ = inputs()
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    scores = np.einsum("bqhd,bkhd->bhqk", qn, kn) * 0.5
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = np.einsum("bhqk,bkhd->bqhd", probs, vn)
    np.testing.assert_allclose(
        np.asarray(recomputing_attention(q, k, v, 0.5)), expected, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16])
def test_low_precision_inputs_keep_their_dtype(dtype):
    q, k, v, _ = inputs(dtype)
    out = recomputing_attention(q, k, v, 0.5)
    assert out.dtype == dtype
    ref = reference(q, k, v, 0.5)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=0.05)


def test_the_implementation_is_resolved_for_the_target_platform():
    from cavmae_jax.models.attention import resolve

    platforms = ("cpu", "gpu", "tpu")
    assert [resolve("auto", p) for p in platforms] == ["recompute", "recompute", "grouped"]
    assert resolve("xla", "cpu") == "xla" and resolve("cudnn", "gpu") == "cudnn"
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        resolve("cudnn", "tpu")
    with pytest.raises(ValueError, match="'flash' needs a TPU"):
        resolve("flash", "gpu")
    with pytest.raises(ValueError, match="'splash' needs a TPU"):
        resolve("splash", "cpu")
    with pytest.raises(ValueError, match="'grouped' needs a TPU"):
        resolve("grouped", "gpu")
    with pytest.raises(ValueError, match="unknown attention 'ring'"):
        resolve("ring", "tpu")


@pytest.mark.parametrize("kernel", ["flash", "splash"])
@pytest.mark.parametrize("length", [49, 128, 177])
def test_tpu_kernels_with_padded_blocks_match_xla(kernel, length):
    """The Pallas TPU kernels (run by Pallas's TPU interpreter on this CPU) with the sequence
    padded to 128-token blocks and the padding masked out by segment ids equal XLA's attention,
    forward and backward, for the lengths the model has (49 visible frame patches, 128 audio,
    177 joint) and a tail of padding rows that never leaks."""
    from jax.experimental.pallas import tpu as pltpu

    from cavmae_jax.models.attention import flash_attention, splash_attention

    keys = jax.random.split(jax.random.key(length), 3)
    q, k, v = (jax.random.normal(key, (2, 2, length, 16)) for key in keys)

    def loss(attention, q, k, v):
        return (attention(q, k, v) * jnp.cos(jnp.arange(length))[:, None]).sum()

    def flash(q, k, v):
        if kernel == "splash":
            return splash_attention(q, k, v, 0.25, interpret=True)
        return flash_attention(q, k, v, 0.25)

    def xla(q, k, v):
        return heads_first_reference(q, k, v, 0.25)

    # flash runs under the TPU interpreter mode; splash takes its own interpret switch
    interpreter = pltpu.force_tpu_interpret_mode() if kernel == "flash" else nullcontext()
    with interpreter:
        out = flash(q, k, v)
        grads = jax.grad(loss, argnums=(1, 2, 3))(flash, q, k, v)
    np.testing.assert_allclose(out, xla(q, k, v), atol=2e-6)
    for got, want in zip(grads, jax.grad(loss, argnums=(1, 2, 3))(xla, q, k, v), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_the_model_setting_chooses_the_kernel():
    """A model built with ``attention="xla"`` runs XLA's attention, not the recomputing one:
    same forward values, different compiled programs."""
    from flax import nnx

    from cavmae_jax.models import CAVMAEFT, tiny

    outputs, programs = [], []
    for implementation in ("xla", "recompute"):
        model = CAVMAEFT(tiny(attention=implementation), nnx.Rngs(0))
        audio = jnp.ones((1, 32, 16))
        image = jnp.ones((1, 16, 16, 3))
        graphdef, state = nnx.split(model)

        def loss(state, audio, image, graphdef=graphdef):
            return nnx.merge(graphdef, state)(audio, image).sum()

        outputs.append(np.asarray(model(audio, image)))
        programs.append(jax.jit(jax.grad(loss)).lower(state, audio, image).as_text())
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    assert programs[0] != programs[1]


def test_a_block_gives_the_same_attention_in_either_layout():
    """The fused projection writes heads-first q, k, v for flash, 128-lane groups for the
    grouped kernel (both on Pallas's interpreter) and tokens-first ones for XLA: the module's
    output is the same."""
    from flax import nnx
    from jax.experimental.pallas import tpu as pltpu

    from cavmae_jax.models.layers import Attention

    x = jax.random.normal(jax.random.key(1), (2, 49, 128))
    outputs = []
    for implementation in ("xla", "flash", "grouped"):
        module = Attention(128, 4, nnx.Rngs(0), implementation=implementation)
        with pltpu.force_tpu_interpret_mode():
            outputs.append(np.asarray(module(x)))
    np.testing.assert_allclose(outputs[1], outputs[0], atol=2e-5)
    np.testing.assert_allclose(outputs[2], outputs[0], atol=2e-5)


@pytest.mark.parametrize("heads", [2, 4, 8])
@pytest.mark.parametrize("length", [49, 177])
def test_the_grouped_kernel_matches_xla_from_the_projection(heads, length):
    """The grouped TPU kernel (on Pallas's interpreter) reads the projection's output 128 lanes
    at a time, 1, 2 or 4 heads to a group (head widths 128, 64, 32), adds the bias itself and
    writes the heads tokens-first; its backward copies dq, dk and dv into their places: forward
    and backward equal XLA's attention on the official q|k|v layout, the bias gradient
    included."""
    from jax.experimental.pallas import tpu as pltpu

    from cavmae_jax.models import grouped_attention

    dim = 256
    scale = (dim // heads) ** -0.5
    keys = jax.random.split(jax.random.key(length + heads), 2)
    projection = jax.random.normal(keys[0], (2, length, 3 * dim))
    bias = jax.random.normal(keys[1], (3 * dim,))
    probe = jnp.cos(jnp.arange(length * dim)).reshape(length, dim)

    def grouped(projection, bias):
        return grouped_attention.attention(projection, bias, dim // heads, scale)

    def xla(projection, bias):
        qkv = (projection + bias).reshape(2, length, 3, heads, dim // heads)
        out = reference(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], scale)
        return out.reshape(2, length, dim)

    def loss(attention, projection, bias):
        return (attention(projection, bias) * probe).sum()

    with pltpu.force_tpu_interpret_mode():
        out = grouped(projection, bias)
        grads = jax.grad(loss, argnums=(1, 2))(grouped, projection, bias)
    np.testing.assert_allclose(out, xla(projection, bias), rtol=1e-5, atol=1e-5)
    want = jax.grad(loss, argnums=(1, 2))(xla, projection, bias)
    for got, expected in zip(grads, want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5)


def test_the_grouped_kernel_gives_way_where_it_does_not_fit():
    """Widths that are not whole 128-lane groups of whole heads, and sequences too long to
    hold in VMEM, run splash; the rest run the grouped kernel."""
    from cavmae_jax.models.attention import for_sequence

    assert for_sequence("grouped", 768, 12, 708) == "grouped"
    assert for_sequence("grouped", 512, 16, 1024) == "grouped"
    assert for_sequence("grouped", 768, 12, 1025) == "splash"
    assert for_sequence("grouped", 64, 1, 49) == "splash"  # narrower than a group
    assert for_sequence("grouped", 768, 4, 49) == "splash"  # a head wider than a group
    assert for_sequence("splash", 768, 12, 49) == "splash"


def test_the_grouped_kernel_in_bfloat16_stays_near_float32():
    """What a TPU runs: bfloat16 projections (float32 scores and softmax inside the kernel).
    The output and the gradients stay within bfloat16's resolution of the float32 result."""
    from jax.experimental.pallas import tpu as pltpu

    from cavmae_jax.models import grouped_attention

    keys = jax.random.split(jax.random.key(7), 3)
    projection = jax.random.normal(keys[0], (2, 177, 3 * 128))
    bias = jax.random.normal(keys[1], (3 * 128,))
    probe = jax.random.normal(keys[2], (2, 177, 128))

    def loss(projection, bias):
        out = grouped_attention.attention(projection, bias, 64, 0.125)
        return (out.astype(jnp.float32) * probe).sum()

    with pltpu.force_tpu_interpret_mode():
        exact = jax.value_and_grad(loss, argnums=(0, 1))(projection, bias)
        low = jax.value_and_grad(loss, argnums=(0, 1))(
            projection.astype(jnp.bfloat16), bias.astype(jnp.bfloat16)
        )
    for got, want in zip(jax.tree.leaves(low), jax.tree.leaves(exact), strict=True):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


SHARDED_GROUPED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from cavmae_jax.models import grouped_attention

# The kernels' contracts in XLA (Pallas's TPU interpreter waits on every device of the process
# once a kernel does its own DMAs): what is tested here is the per-device plumbing around them.
def heads(x, bias):
    b, n, width = x.shape
    return (x + bias).reshape(b, n, 3, 4, width // 12)

def forward(qkv, bias, head_dim, scale):
    q = heads(qkv, bias)
    out = jax.nn.dot_product_attention(q[:, :, 0], q[:, :, 1], q[:, :, 2], scale=scale)
    return out.reshape(q.shape[0], q.shape[1], -1)

def backward(qkv, bias, d_out, head_dim, scale):
    d_qkv = jax.vjp(lambda x: forward(x, bias, head_dim, scale), qkv)[1](d_out)[0]
    per_clip = d_qkv.sum(1).reshape(qkv.shape[0], 3, -1, 128)
    return d_qkv, jnp.swapaxes(per_clip, 1, 2)  # [B, G, 3, 128], as the kernel writes it

grouped_attention._forward, grouped_attention._backward = forward, backward
keys = jax.random.split(jax.random.key(3), 3)
projection = jax.random.normal(keys[0], (4, 49, 3 * 256))
bias = jax.random.normal(keys[1], (3 * 256,))
probe = jax.random.normal(keys[2], (4, 49, 256))

def loss(projection, bias):
    return (grouped_attention.attention(projection, bias, 64, 0.125) * probe).sum()

step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
alone = step(projection, bias)
mesh = jax.make_mesh((2, 2), ("data", "fsdp"))
rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
with jax.set_mesh(mesh):
    sharded = step(jax.device_put(projection, rows), bias)
    text = step.lower(jax.device_put(projection, rows), bias).as_text()
assert "shard_map" in text or "sdy.manual_computation" in text
# the value sums 50,176 products of size about 1 to about 8, in another order per device:
# float32 rounding of that order is of the order of 1e-4; a lost or doubled clip moves it by tens
(value, grads), (sharded_value, sharded_grads) = alone, sharded
np.testing.assert_allclose(float(value), float(sharded_value), rtol=0, atol=2e-3)
for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(sharded_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
print("same")
"""


def test_the_grouped_kernel_runs_per_device_on_a_mesh():
    """On a 2 x 2 mesh of fake CPU devices the kernels run per device on their rows of the
    batch (by shard_map), and the value and the gradients (the per-clip bias gradients summed
    over every device's clips) equal the unsharded ones."""
    import subprocess
    import sys

    from worker_env import fake_devices_env

    done = subprocess.run(
        [sys.executable, "-c", SHARDED_GROUPED],
        env=fake_devices_env(4),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "same"
