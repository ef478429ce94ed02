"""The transformer MLP of TPUs as Pallas kernels: the ``fused`` implementation.

fc1 -> exact GELU -> fc2, with the 4x-wide hidden state kept in VMEM. Left to XLA, the hidden
state [T, 4D] crosses HBM several times each way (fc1's output, GELU's, their gradients): about
100 KB per token and layer at ViT-B width, the largest share of a step's traffic. Here the
forward kernel reads the tokens and both weights once and writes only the output; the backward
kernel recomputes the hidden state from the tokens.

Forward: a grid over token tiles; in each tile, chunk by chunk of hidden units, a = x w1 + b1,
h = gelu(a), y += h w2, accumulated in float32.
Backward: a grid of (hidden half, token tile). For its half of the hidden units, a step
recomputes a and h, forms dh = dy w2^T and da = dh gelu'(a), and adds x^T da, h^T dy and the sum
of da to the half's weight and bias gradients, which stay in VMEM (float32) across the token
tiles and are written once, in the weights' dtype, as XLA's matmuls write them; the half's share
of dx, da w1^T, goes to HBM and XLA adds the two. Halves keep the resident weight
gradients small, and give v5p's two TensorCores one each.

The last token tile may run past the tokens: its extra rows are zeroed before the backward
kernel uses them (their outputs are never written back).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec

from cavmae_jax.models import mesh_context

LANES = 128
TILE = 256  # tokens per grid step
FORWARD_CHUNK = 512  # hidden units per step of the forward kernel's inner loop
HALVES = 2  # hidden-unit parts of the backward grid
VMEM_BYTES = 48 * 2**20  # the backward kernel at ViT-B width: about 36 MiB
# Fewer tokens per device than this and XLA's MLP moves fewer bytes: the kernels' fixed cost
# (both weights read and their gradients written per device, dx in halves) outweighs the
# hidden state they keep on chip (pretraining at one clip per v6e chip, 177-708 tokens:
# 3.33 ms of traffic against 3.19)
MIN_TOKENS = 1024
IMPLEMENTATIONS = ("auto", "xla", "fused")
_CONTRACT_ROWS = (((0,), (0,)), ((), ()))  # a^T . b
_CONTRACT_COLUMNS = (((1,), (1,)), ((), ()))  # a . b^T


def resolve(implementation: str, platform: str) -> str:
    """The concrete MLP of ``implementation`` on ``platform``: ``auto`` is ``fused`` on TPUs."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown mlp {implementation!r}; expected one of {IMPLEMENTATIONS}")
    if implementation == "auto":
        return "fused" if platform == "tpu" else "xla"
    if implementation == "fused" and platform != "tpu":
        raise ValueError(f"mlp 'fused' needs a TPU, not {platform}")
    return implementation


def fits(dim: int, hidden: int, tokens: int) -> bool:
    """Whether the kernels take these widths (whole 128-lane columns, halves included) and pay
    at ``tokens`` per device."""
    return dim % LANES == 0 and hidden % (HALVES * LANES) == 0 and tokens >= MIN_TOKENS


@jax.custom_vjp
def mlp(x: jax.Array, w1: jax.Array, b1: jax.Array, w2: jax.Array, b2: jax.Array) -> jax.Array:
    """fc2(gelu(fc1(x))) for x [B, N, D], w1 [D, H], w2 [H, D]; biases in float32."""
    return _per_device(_forward, (x, w1, b1, w2, b2), outputs=1)


def _mlp_forward(x, w1, b1, w2, b2):
    return mlp(x, w1, b1, w2, b2), (x, w1, b1, w2)


def _mlp_backward(saved, d_y):
    x, w1, b1, w2 = saved
    d_x, d_w1, d_b1, d_w2 = _per_device(_backward, (x, w1, b1, w2, d_y), outputs=4)
    d_b2 = jnp.sum(d_y.astype(jnp.float32), axis=(0, 1))
    return (
        jnp.sum(d_x.astype(jnp.float32), axis=0).astype(x.dtype),
        jnp.sum(d_w1, axis=0),
        jnp.sum(d_b1, axis=0).reshape(b1.shape).astype(b1.dtype),
        jnp.sum(d_w2, axis=0),
        d_b2.astype(b1.dtype),
    )


mlp.defvjp(_mlp_forward, _mlp_backward)


def _per_device(kernel, args, outputs: int):
    """``kernel`` on each device's tokens under a mesh (a Mosaic kernel is not partitioned by
    XLA), the weights whole: the blocks gather them before use. Results carry a leading axis
    (halves of dx, or devices of the weight gradients) that the caller sums."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(*args)
    batch = PartitionSpec(mesh_context.batch_axes(mesh))
    whole = PartitionSpec()
    specs = tuple(batch if a.ndim == 3 else whole for a in args)
    out_specs = batch if outputs == 1 else (PartitionSpec(None, *batch),) + (batch,) * 3
    sharded = jax.shard_map(kernel, mesh=mesh, in_specs=specs, out_specs=out_specs, check_vma=False)
    return sharded(*args)


def _tile(tokens: int) -> int:
    return tokens if tokens <= TILE else TILE


def _forward(x, w1, b1, w2, b2):
    batch, length, dim = x.shape
    hidden = w1.shape[1]
    tokens = batch * length
    tile = _tile(tokens)
    weight = lambda t: (0, 0)  # noqa: E731  (the same block at every step: read once)
    return pl.pallas_call(
        functools.partial(_forward_kernel, chunk=math.gcd(hidden, FORWARD_CHUNK)),
        out_shape=jax.ShapeDtypeStruct((tokens, dim), x.dtype),
        grid=(pl.cdiv(tokens, tile),),
        in_specs=[
            pl.BlockSpec((tile, dim), lambda t: (t, 0)),
            pl.BlockSpec((dim, hidden), weight),
            pl.BlockSpec((1, hidden), weight),
            pl.BlockSpec((hidden, dim), weight),
            pl.BlockSpec((1, dim), weight),
        ],
        out_specs=pl.BlockSpec((tile, dim), lambda t: (t, 0)),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel",), vmem_limit_bytes=VMEM_BYTES
        ),
        cost_estimate=pl.CostEstimate(
            flops=4 * tokens * dim * hidden,
            transcendentals=tokens * hidden,
            bytes_accessed=_bytes(x) * 2 + _bytes(w1) + _bytes(w2) + _bytes(b1) + _bytes(b2),
        ),
        name="fused_mlp_forward",
    )(x.reshape(tokens, dim), w1, b1.reshape(1, hidden), w2, b2.reshape(1, dim)).reshape(x.shape)


def _backward(x, w1, b1, w2, d_y):
    """dx in two halves [2, B, N, D], and this device's weight gradients (the weights' dtype)
    and float32 bias gradient, each with a leading axis of 1."""
    batch, length, dim = x.shape
    hidden = w1.shape[1]
    half = hidden // HALVES
    tokens = batch * length
    tile = _tile(tokens)
    tiles = pl.cdiv(tokens, tile)
    rows = lambda h, t: (t, 0)  # noqa: E731
    f32 = jnp.float32
    d_x, d_w1, d_b1, d_w2 = pl.pallas_call(
        functools.partial(_backward_kernel, tokens=tokens, tile=tile),
        out_shape=(
            jax.ShapeDtypeStruct((HALVES, tokens, dim), x.dtype),
            jax.ShapeDtypeStruct((dim, hidden), w1.dtype),
            jax.ShapeDtypeStruct((1, hidden), f32),
            jax.ShapeDtypeStruct((hidden, dim), w2.dtype),
        ),
        grid=(HALVES, tiles),
        in_specs=[
            pl.BlockSpec((tile, dim), rows),
            pl.BlockSpec((dim, half), lambda h, t: (0, h)),
            pl.BlockSpec((1, half), lambda h, t: (0, h)),
            pl.BlockSpec((half, dim), lambda h, t: (h, 0)),
            pl.BlockSpec((tile, dim), rows),
        ],
        out_specs=(
            pl.BlockSpec((None, tile, dim), lambda h, t: (h, t, 0)),
            pl.BlockSpec((dim, half), lambda h, t: (0, h)),
            pl.BlockSpec((1, half), lambda h, t: (0, h)),
            pl.BlockSpec((half, dim), lambda h, t: (h, 0)),
        ),
        scratch_shapes=[pltpu.VMEM((dim, half), f32), pltpu.VMEM((half, dim), f32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=VMEM_BYTES
        ),
        cost_estimate=pl.CostEstimate(
            flops=10 * tokens * dim * hidden,  # a again, dh, dx, dw1, dw2
            transcendentals=2 * tokens * hidden,
            bytes_accessed=HALVES * (_bytes(x) * 3)  # x and dy read, dx written, per half
            + 2 * (_bytes(w1) + _bytes(w2))  # read, and their gradients written
            + 2 * _bytes(b1),
        ),
        name="fused_mlp_backward",
    )(x.reshape(tokens, dim), w1, b1.reshape(1, hidden), w2, d_y.reshape(tokens, dim))
    return d_x.reshape(HALVES, *x.shape), d_w1[None], d_b1[None], d_w2[None]


def _bytes(a: jax.Array) -> int:
    return a.size * a.dtype.itemsize


def _normal_cdf(a):
    """Phi(a) of float32 ``a``: the exact GELU is a Phi(a), its slope Phi(a) + a phi(a)."""
    return 0.5 * (1.0 + lax.erf(a * (1.0 / math.sqrt(2.0))))


def _forward_kernel(x_ref, w1_ref, b1_ref, w2_ref, b2_ref, y_ref, *, chunk):
    x = x_ref[...]
    out = jnp.zeros(y_ref.shape, jnp.float32)
    for start in range(0, w1_ref.shape[1], chunk):
        part = slice(start, start + chunk)
        a = jnp.dot(x, w1_ref[:, part], preferred_element_type=jnp.float32) + b1_ref[:, part]
        h = (a * _normal_cdf(a)).astype(x.dtype)
        out = out + jnp.dot(h, w2_ref[part, :], preferred_element_type=jnp.float32)
    y_ref[...] = (out + b2_ref[...]).astype(y_ref.dtype)


def _backward_kernel(
    x_ref,
    w1_ref,
    b1_ref,
    w2_ref,
    d_y_ref,
    d_x_ref,
    d_w1_ref,
    d_b1_ref,
    d_w2_ref,
    d_w1_sum,
    d_w2_sum,
    *,
    tokens,
    tile,
):
    step = pl.program_id(1)

    @pl.when(step == 0)
    def _():
        d_w1_sum[...] = jnp.zeros(d_w1_sum.shape, d_w1_sum.dtype)
        d_b1_ref[...] = jnp.zeros(d_b1_ref.shape, d_b1_ref.dtype)
        d_w2_sum[...] = jnp.zeros(d_w2_sum.shape, d_w2_sum.dtype)

    real = step * tile + lax.broadcasted_iota(jnp.int32, (tile, 1), 0) < tokens
    x = jnp.where(real, x_ref[...], 0)
    d_y = jnp.where(real, d_y_ref[...], 0)
    f32 = jnp.float32
    a = jnp.dot(x, w1_ref[...], preferred_element_type=f32) + b1_ref[...]
    cdf = _normal_cdf(a)
    h = a * cdf
    slope = cdf + a * jnp.exp(-0.5 * a * a) * (1.0 / math.sqrt(2.0 * math.pi))
    d_h = lax.dot_general(d_y, w2_ref[...], _CONTRACT_COLUMNS, preferred_element_type=f32)
    d_a = d_h * slope
    d_a_low = d_a.astype(x.dtype)
    d_x_ref[...] = lax.dot_general(
        d_a_low, w1_ref[...], _CONTRACT_COLUMNS, preferred_element_type=f32
    ).astype(d_x_ref.dtype)
    d_w1_sum[...] += lax.dot_general(x, d_a_low, _CONTRACT_ROWS, preferred_element_type=f32)
    d_b1_ref[...] += jnp.sum(d_a, axis=0, keepdims=True)
    d_w2_sum[...] += lax.dot_general(
        h.astype(x.dtype), d_y, _CONTRACT_ROWS, preferred_element_type=f32
    )

    @pl.when(step == pl.num_programs(1) - 1)
    def _():
        d_w1_ref[...] = d_w1_sum[...].astype(d_w1_ref.dtype)
        d_w2_ref[...] = d_w2_sum[...].astype(d_w2_ref.dtype)
