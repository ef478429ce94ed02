"""Attention of TPUs on the qkv projection's own output: the ``grouped`` implementation.

The projection writes [B, N, 3D] in the official column order, (q|k|v) x heads x hd, so that
128 lanes of q, of k or of v hold 128 // hd whole heads: a group. One grid step of the kernel
reads, for one clip and the whole sequence, the q, the k and the v block of one group (three
block specs on the same array), adds their bias, forms, normalises and applies the scores of
the group's heads in VMEM, and writes the group's 128 lanes of the tokens-first [B, N, D]
output, which the output projection reads as it is. Nothing is transposed, padded or reordered
in HBM, and no softmax statistics leave the chip.

A head is picked out of its group by zeroing the other heads' lanes of q: q_j . k over all 128
lanes is then q_j . k_j. The same zeroing of the output gradient gives each head's share of
dk and dv. On the TPU's 128-wide matrix unit a 64-lane (or 32-lane) contraction takes as long
as a 128-lane one, so the zeros cost no matrix-unit time; the cost estimates count only the
heads' own products.

The backward kernel recomputes the probabilities from q and k instead of reading softmax
statistics, and forms delta = rowsum(dO * O) as rowsum(P * dP), so that it needs only the
projection's output and the output gradient: what a ``matmuls`` remat policy keeps anyway. It
copies dq, dk and dv into their three places of one [B, N, 3D] gradient by DMA (a block spec
gives an output one place per step), and sums the bias gradient on the chip.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec

from cavmae_jax.models import mesh_context

LANES = 128  # lanes of a TPU vector register: the width of one q, k or v block
# The longest sequence held whole: the float32 [N, N] scores, probabilities and their
# gradients of one head fit VMEM_BYTES (compiled for v5e, v5p and v6e at 1024 tokens; 1536
# does not fit).
WHOLE_SEQUENCE_LIMIT = 1024
VMEM_BYTES = 32 * 2**20
_CONTRACT_LANES = (((1,), (1,)), ((), ()))  # a . b^T
_CONTRACT_TOKENS = (((0,), (0,)), ((), ()))  # a^T . b


def fits(dim: int, heads: int, length: int) -> bool:
    """Whether the kernel takes this attention: whole 128-lane groups of whole heads, and a
    sequence that fits in VMEM."""
    head_dim = dim // heads
    return dim % LANES == 0 and LANES % head_dim == 0 and length <= WHOLE_SEQUENCE_LIMIT


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def attention(qkv: jax.Array, bias: jax.Array, head_dim: int, scale: float) -> jax.Array:
    """softmax((q k^T) * scale) v per head of the projection ``qkv`` [B, N, 3D] before its
    ``bias`` [3D] (added in the kernel), official column order; -> [B, N, D]."""
    return _per_device(_forward, (qkv, bias), head_dim, scale)


def _attention_forward(qkv, bias, head_dim, scale):
    return attention(qkv, bias, head_dim, scale), (qkv, bias)


def _attention_backward(head_dim, scale, saved, d_out):
    qkv, bias = saved
    d_qkv, d_bias = _per_device(_backward, (qkv, bias, d_out), head_dim, scale)
    d_bias = jnp.swapaxes(jnp.sum(d_bias, axis=0), 0, 1)  # [G, 3, 128] -> [3, G, 128]
    return d_qkv, d_bias.reshape(bias.shape).astype(bias.dtype)


attention.defvjp(_attention_forward, _attention_backward)


def _per_device(kernel, args, head_dim: int, scale: float):
    """``kernel(*args)`` per device under a mesh, the batch over every mesh axis (a Mosaic
    kernel is not partitioned by XLA; ``attention.for_sequence`` keeps this kernel off meshes
    with a ``tensor`` axis). Only the kernels run inside: gradients are taken outside."""
    call = functools.partial(kernel, head_dim=head_dim, scale=scale)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return call(*args)
    activations = PartitionSpec(mesh_context.batch_axes(mesh))
    specs = (activations, PartitionSpec(), activations)[: len(args)]
    outputs = activations if len(args) == 2 else (activations, activations)
    return jax.shard_map(call, mesh=mesh, in_specs=specs, out_specs=outputs, check_vma=False)(*args)


def _forward(qkv: jax.Array, bias: jax.Array, head_dim: int, scale: float) -> jax.Array:
    batch, length, width = qkv.shape
    groups = width // (3 * LANES)
    useful = batch * length * length * groups * LANES  # one q.k^T product of every head
    return pl.pallas_call(
        functools.partial(_forward_kernel, head_dim=head_dim, scale=scale),
        out_shape=jax.ShapeDtypeStruct((batch, length, groups * LANES), qkv.dtype),
        grid=(batch, groups),
        in_specs=_inputs(length, groups),
        out_specs=_block(length, groups, 0),
        compiler_params=_compiler_params(),
        cost_estimate=pl.CostEstimate(
            flops=4 * useful,
            transcendentals=useful // head_dim,
            bytes_accessed=qkv.size * qkv.dtype.itemsize * 4 // 3,
        ),
        name="grouped_attention_forward",
    )(*_operands(qkv, bias))


def _backward(qkv, bias, d_out, head_dim: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """d_qkv [B, N, 3D], and each clip's bias gradient in float32, [B, G, 3 (q|k|v), 128]."""
    batch, length, width = qkv.shape
    groups = width // (3 * LANES)
    useful = batch * length * length * groups * LANES
    return pl.pallas_call(
        functools.partial(_backward_kernel, head_dim=head_dim, scale=scale),
        out_shape=(
            jax.ShapeDtypeStruct(qkv.shape, qkv.dtype),
            jax.ShapeDtypeStruct((batch, groups, 3, LANES), jnp.float32),
        ),
        grid=(batch, groups),
        in_specs=[*_inputs(length, groups), _block(length, groups, 0)],
        out_specs=(
            pl.BlockSpec(memory_space=pl.ANY),  # written by the kernel's own DMAs
            pl.BlockSpec((None, None, 3, LANES), lambda b, g: (b, g, 0, 0)),
        ),
        scratch_shapes=_gradient_scratch(length, qkv.dtype),
        compiler_params=_compiler_params(),
        cost_estimate=pl.CostEstimate(
            flops=10 * useful,  # q.k^T again, dO.v^T, dS.k, dS^T.q, P^T.dO
            transcendentals=useful // head_dim,
            bytes_accessed=qkv.size * qkv.dtype.itemsize * 7 // 3,
        ),
        name="grouped_attention_backward",
    )(*_operands(qkv, bias), d_out)


def _operands(qkv: jax.Array, bias: jax.Array) -> tuple:
    """The projection and its bias, each once for q, for k and for v."""
    bias = bias.reshape(1, -1)
    return qkv, qkv, qkv, bias, bias, bias


def _block(length: int, groups: int, part: int):
    """One clip's 128 lanes of group g of q (part 0), k (1) or v (2): [N, 128]."""
    return pl.BlockSpec((None, length, LANES), lambda b, g: (b, 0, part * groups + g))


def _inputs(length: int, groups: int) -> list:
    """q, k and v blocks of the projection, then of the bias."""
    bias = [pl.BlockSpec((1, LANES), lambda b, g, p=p: (0, p * groups + g)) for p in range(3)]
    return [_block(length, groups, p) for p in range(3)] + bias


def _gradient_scratch(length: int, dtype) -> list:
    return [pltpu.VMEM((3, length, LANES), dtype), pltpu.SemaphoreType.DMA((3,))]


def _compiler_params():
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel"), vmem_limit_bytes=VMEM_BYTES
    )


def _head_lanes(head_dim: int):
    """Each lane's head within the group, [1, 128]."""
    return lax.broadcasted_iota(jnp.int32, (1, LANES), 1) // head_dim


def _probabilities(q_head, k, scale):
    """softmax((q_head . k^T) * scale) over the keys, float32 [N, N]."""
    scores = lax.dot_general(q_head, k, _CONTRACT_LANES, preferred_element_type=jnp.float32)
    scores = scores * scale
    weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    return weights / jnp.sum(weights, axis=-1, keepdims=True)


def _forward_kernel(q_ref, k_ref, v_ref, q_bias, k_bias, v_bias, out_ref, *, head_dim, scale):
    q, k, v = q_ref[...] + q_bias[...], k_ref[...] + k_bias[...], v_ref[...] + v_bias[...]
    head = _head_lanes(head_dim)
    out = jnp.zeros(q.shape, jnp.float32)
    for j in range(LANES // head_dim):
        mine = head == j
        probs = _probabilities(jnp.where(mine, q, 0), k, scale)
        values = jnp.dot(probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
        out = jnp.where(mine, values, out)
    out_ref[...] = out.astype(out_ref.dtype)


def _backward_kernel(
    q_ref,
    k_ref,
    v_ref,
    q_bias,
    k_bias,
    v_bias,
    d_out_ref,
    d_qkv_hbm,
    d_bias_ref,
    grads,
    copies,
    *,
    head_dim,
    scale,
):
    q, k, v = q_ref[...] + q_bias[...], k_ref[...] + k_bias[...], v_ref[...] + v_bias[...]
    d_out = d_out_ref[...]
    head = _head_lanes(head_dim)
    f32 = jnp.float32
    d_q, d_k, d_v = (jnp.zeros(q.shape, f32) for _ in range(3))
    for j in range(LANES // head_dim):
        mine = head == j
        q_head = jnp.where(mine, q, 0)
        d_out_head = jnp.where(mine, d_out, 0)
        probs = _probabilities(q_head, k, scale)
        d_probs = lax.dot_general(d_out_head, v, _CONTRACT_LANES, preferred_element_type=f32)
        row = jnp.sum(probs * d_probs, axis=-1, keepdims=True)  # = dO . O of each query
        d_scores = (probs * (d_probs - row) * scale).astype(q.dtype)
        d_q = jnp.where(mine, d_q + jnp.dot(d_scores, k, preferred_element_type=f32), d_q)
        d_k = d_k + lax.dot_general(d_scores, q_head, _CONTRACT_TOKENS, preferred_element_type=f32)
        d_v = d_v + lax.dot_general(
            probs.astype(d_out.dtype), d_out_head, _CONTRACT_TOKENS, preferred_element_type=f32
        )
    clip, group, groups = pl.program_id(0), pl.program_id(1), pl.num_programs(1)
    transfers = []
    for part, grad in enumerate((d_q, d_k, d_v)):
        grads[part] = grad.astype(grads.dtype)
        d_bias_ref[part : part + 1] = jnp.sum(grads[part].astype(f32), axis=0, keepdims=True)
        lanes = pl.ds(pl.multiple_of((part * groups + group) * LANES, LANES), LANES)
        transfers.append(_start_copy(grads.at[part], d_qkv_hbm.at[clip, :, lanes], copies.at[part]))
    for transfer in transfers:
        transfer.wait()


def _start_copy(source, target, semaphore):
    copy = pltpu.make_async_copy(source, target, semaphore)
    copy.start()
    return copy
