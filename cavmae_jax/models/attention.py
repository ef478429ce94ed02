"""Scaled dot-product attention (softmax over keys, scale after q.k).

Each implementation takes q, k and v in its own layout (``heads_first``), which the fused qkv
projection writes directly, so that no transpose runs in between: the TPU kernels read
heads-first [B, H, N, hd]; the others tokens-first [B, N, H, hd], as ``jax.nn`` does (on CPU,
XLA runs the recomputing kernel about a third slower on heads-first arrays).

The implementation is a model setting (``ModelConfig.attention``):
  * ``xla``: ``jax.nn.dot_product_attention`` lowered by XLA;
  * ``cudnn``: the same call with cuDNN's fused flash kernel (NVIDIA GPUs; it refuses some
    sequence lengths, e.g. the 49 visible visual tokens of a 75% mask);
  * ``recompute``: the custom-VJP version below, which saves only the log-sum-exp for the
    backward pass and recomputes the probabilities instead of storing [B, H, N, N] of them. On
    CPU, XLA also fuses the softmax reductions of the default gradient into the batched matmuls
    and runs them slowly: this one is 2.3x faster for forward + backward at the decoder's size.
    On an H200 the full-size bfloat16 pretraining step at batch 48 runs 454 clips/s with 20 GiB
    of temporaries against 384 clips/s and 36 GiB with ``xla``, and batch 256 fits (105 GiB)
    where ``xla`` needs 188 GiB (``bench/attention_backends.py``);
  * ``flash``: the Pallas flash-attention kernel of TPUs (``jax.experimental.pallas.ops.tpu``),
    which never writes the [B, H, N, N] scores to HBM. Its blocks are 128 tokens long, so the
    sequence is padded to a multiple of 128 and the padding is kept out of every softmax by
    segment ids (real tokens 1, padding 0). It keeps two float32 softmax statistics per query,
    each 128 lanes wide, for its backward pass;
  * ``splash``: the Pallas splash-attention kernel of TPUs, padded and masked the same way; it
    keeps one log-sum-exp per query and forms dq, dk and dv in one fused backward kernel, which
    moves less than half of flash's HBM bytes for the decoder's 708 tokens (``docs/tpu.md``);
    * ``grouped``: our Pallas kernel of TPUs for sequences short enough to hold whole in VMEM
    (up to 1024 tokens, which CAV-MAE's are; ``grouped_attention``). It reads q, k and v
    straight from the qkv projection's [B, N, 3D] output, 128 lanes (2 heads of 64, 4 of 32)
    at a time, and writes the output tokens-first [B, N, D]: no transpose, no padding of the
    sequence or of 64-wide heads to 128 lanes, no softmax statistics in HBM; its backward
    kernel writes dq, dk and dv into one [B, N, 3D] gradient. Where a model's widths, a
    sequence or a mesh with a ``tensor`` axis do not fit it, ``splash`` runs instead;
  * ``auto``: ``recompute`` on CPU and GPU, ``grouped`` on TPU.
    Trainers resolve it once for the platform of their mesh (``resolve``), which may be a TPU
    compiled for from a CPU host; a model used on its own resolves it for the default backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from cavmae_jax.models import grouped_attention, mesh_context

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "recompute", "flash", "splash", "grouped")
FLASH_BLOCK = 128  # tokens per block of the TPU kernel
# The name of what the TPU kernels keep for their backward pass (output and softmax
# statistics): a ``matmuls`` remat policy saves it, so no forward kernel runs twice.
KERNEL_RESIDUALS = "attention_residuals"
HEADS_FIRST = ("flash", "splash")
TPU_KERNELS = ("flash", "splash", "grouped")


def resolve(implementation: str, platform: str) -> str:
    """The concrete implementation of ``implementation`` on ``platform`` (cpu, gpu, tpu)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention {implementation!r}; expected one of {IMPLEMENTATIONS}")
    if implementation == "auto":
        return "grouped" if platform == "tpu" else "recompute"
    if implementation == "cudnn" and platform != "gpu":
        raise ValueError(f"attention 'cudnn' needs an NVIDIA GPU, not {platform}")
    if implementation in TPU_KERNELS and platform != "tpu":
        raise ValueError(f"attention {implementation!r} needs a TPU, not {platform}")
    return implementation


def concrete(implementation: str) -> str:
    """``implementation`` with ``auto`` resolved for the default backend; a concrete choice is
    taken as it is (it may target another platform)."""
    if implementation == "auto":
        return resolve(implementation, jax.default_backend())
    return implementation


def for_sequence(implementation: str, dim: int, heads: int, length: int) -> str:
    """The concrete implementation that runs ``length`` tokens of a ``dim``-wide, ``heads``-head
    attention: ``grouped`` gives way to ``splash`` where it does not fit (``splash`` splits
    the heads over a ``tensor`` mesh axis; ``grouped`` runs on whole rows of the projection)."""
    implementation = concrete(implementation)
    mesh = jax.sharding.get_abstract_mesh()
    split_heads = not mesh.empty and mesh.shape.get("tensor", 1) > 1
    if implementation == "grouped" and (
        split_heads or not grouped_attention.fits(dim, heads, length)
    ):
        return "splash"
    return implementation


def heads_first(implementation: str) -> bool:
    """Whether ``implementation`` takes [B, H, N, hd] (else [B, N, H, hd])."""
    return concrete(implementation) in HEADS_FIRST


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, scale: float, implementation: str = "auto"
) -> jax.Array:
    """softmax(q k^T * scale) v for q, k, v in the implementation's layout (``heads_first``)."""
    implementation = concrete(implementation)
    if implementation == "recompute":
        return recomputing_attention(q, k, v, scale)
    if implementation == "flash":
        return flash_attention(q, k, v, scale)
    if implementation == "splash":
        return per_device(splash_attention, q, k, v, scale)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """The TPU flash kernel on [B, H, N, hd], per device under a mesh (``per_device``)."""
    return per_device(_flash_attention, q, k, v, scale)


def per_device(kernel, q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """A TPU Pallas kernel on [B, H, N, hd]. A Mosaic kernel is not partitioned by XLA: under
    a mesh (the trainers set it) it runs per device by ``shard_map``, the batch split over every
    mesh axis but ``tensor``, the heads over ``tensor`` when it divides them."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, scale)
    batch = mesh_context.batch_axes(mesh)
    tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if tensor > 1 and q.shape[1] % tensor == 0 else None
    spec = PartitionSpec(batch, heads, None, None)
    sharded = jax.shard_map(
        functools.partial(kernel, scale=scale),
        mesh=mesh,
        in_specs=(spec, spec, spec),
        out_specs=spec,
        check_vma=False,
    )
    return sharded(q, k, v)


def _flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """The kernel on one device's [B, H, N, hd], with N padded to whole blocks."""
    from jax.experimental.pallas.ops.tpu import flash_attention as pallas

    length = q.shape[2]
    padded = -(-length // FLASH_BLOCK) * FLASH_BLOCK
    real = (jnp.arange(padded) < length).astype(jnp.int32)
    segments = jnp.broadcast_to(real, (q.shape[0], padded))
    q, k, v = (_padded_tokens(x, padded) for x in (q, k, v))
    out = pallas.flash_attention(
        q, k, v, segment_ids=pallas.SegmentIds(segments, segments), sm_scale=scale
    )
    return out[:, :, :length]


def _padded_tokens(x: jax.Array, padded: int) -> jax.Array:
    """[B, H, N, hd] -> [B, H, padded, hd] with zero rows at the end."""
    return jnp.pad(x, ((0, 0), (0, 0), (0, padded - x.shape[2]), (0, 0)))


def splash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, scale: float, interpret: bool = False
) -> jax.Array:
    """The TPU splash kernel on one device's [B, H, N, hd], N padded to whole 128-token blocks
    and the padding kept out by segment ids. Beside the output it saves one float32
    log-sum-exp per query for the backward pass (the flash kernel keeps two, 128 lanes wide),
    and its fused backward kernel forms dq, dk and dv in one pass. ``interpret`` runs it on
    Pallas's interpreter (tests on a CPU)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    batch, heads, length, _ = q.shape
    padded = -(-length // FLASH_BLOCK) * FLASH_BLOCK
    block = max(b for b in (128, 256, 384, 512, 768) if padded % b == 0)
    sizes = sk.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        use_fused_bwd_kernel=True,
    )
    mask = sm.MultiHeadMask([sm.FullMask((padded, padded))] * heads)
    kernel = sk.make_splash_mha(
        mask,
        head_shards=1,
        q_seq_shards=1,
        block_sizes=sizes,
        residual_checkpoint_name=KERNEL_RESIDUALS,
        interpret=interpret,
    )
    real = (jnp.arange(padded) < length).astype(jnp.int32)
    segments = sk.SegmentIds(real, real)
    q = q * jnp.asarray(scale, q.dtype)
    q, k, v = (_padded_tokens(x, padded) for x in (q, k, v))
    out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(q, k, v, segments)
    return out[:, :, :length]


def _scores(q, k, scale):
    return jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale


def _forward(q, k, v, scale):
    scores = _scores(q, k, scale)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - peak)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probs = (weights / total).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype), peak + jnp.log(total)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def recomputing_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """Attention whose backward recomputes the probabilities from the saved log-sum-exp."""
    return _forward(q, k, v, scale)[0]


def _fwd(q, k, v, scale):
    out, logsumexp = _forward(q, k, v, scale)
    return out, (q, k, v, out, logsumexp)


def _bwd(scale, saved, d_out):
    q, k, v, out, logsumexp = saved
    f32 = jnp.float32
    probs = jnp.exp(_scores(q, k, scale) - logsumexp)
    d_v = jnp.einsum(
        "bhqk,bqhd->bkhd", probs.astype(d_out.dtype), d_out, preferred_element_type=f32
    )
    d_probs = jnp.einsum("bqhd,bkhd->bhqk", d_out, v, preferred_element_type=f32)
    row = jnp.einsum("bqhd,bqhd->bhq", d_out, out, preferred_element_type=f32)[..., None]
    d_scores = (probs * (d_probs - row) * scale).astype(q.dtype)
    d_q = jnp.einsum("bhqk,bkhd->bqhd", d_scores, k, preferred_element_type=f32)
    d_k = jnp.einsum("bhqk,bqhd->bkhd", d_scores, q, preferred_element_type=f32)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)


recomputing_attention.defvjp(_fwd, _bwd)
