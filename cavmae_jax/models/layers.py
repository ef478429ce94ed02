"""Transformer building blocks with the official CAV-MAE parameter layout.

Attribute names follow the official PyTorch names (``attn.qkv``, ``mlp.fc1``, ``norm1_a``...)
so that conversion from a ``.pth`` is a rename-and-transpose table. Parameters carry logical axis
names (``embed``, ``mlp``, ``heads``, ``patch``, ``classes``) that a rules table maps to mesh axes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from cavmae_jax.models import attention as attention_lib
from cavmae_jax.models import fused_mlp, grouped_attention, mesh_context

LN_EPS = 1e-5  # PyTorch's nn.LayerNorm default, everywhere in the official model (behaviour 1)
# What a block keeps for its backward pass (``ModelConfig.remat``): ``none`` every activation,
# ``matmuls`` only the outputs of its matrix multiplies (LayerNorm, GELU and the residual adds
# are recomputed, fused into the backward kernels that read them; attention is recomputed from
# its saved inputs), ``full`` only its input. ``auto``: ``matmuls`` on TPUs, ``none`` elsewhere.
REMAT = ("auto", "none", "matmuls", "full")


def resolve_remat(remat: str | bool, platform: str) -> str:
    """The concrete policy of ``remat`` on ``platform`` (True / False: ``full`` / ``none``)."""
    if isinstance(remat, bool):
        return "full" if remat else "none"
    if remat not in REMAT:
        raise ValueError(f"unknown remat {remat!r}; expected one of {REMAT}")
    if remat == "auto":
        return "matmuls" if platform == "tpu" else "none"
    return remat


def logical(*names: str | None) -> dict:
    """Variable metadata naming a parameter's logical axes (sharded later, by rules)."""
    return {"out_sharding": names, "eager_sharding": False}


xavier_uniform = nnx.initializers.xavier_uniform()


def symmetric_uniform(bound: float):
    """Initializer drawing from U(-bound, bound) (PyTorch's default conv bias init)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class LayerNorm(nnx.LayerNorm):
    """PyTorch's LayerNorm (eps 1e-5, two-pass biased variance) computed in float32 whatever
    the input, with float32 scale and bias; only the output takes ``dtype`` (None: float32).
    In a bfloat16 model the block norms read and write bfloat16 and keep their statistics in
    float32 inside one fusion."""

    def __call__(self, x: jax.Array) -> jax.Array:
        with jax.named_scope("layernorm"):
            x32 = x.astype(jnp.float32)
            mean = jnp.mean(x32, axis=-1, keepdims=True)
            centred = x32 - mean
            var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
            y = centred * jax.lax.rsqrt(var + self.epsilon) * self.scale[...] + self.bias[...]
            return y.astype(self.dtype or jnp.float32)


def layer_norm(dim: int, rngs: nnx.Rngs, dtype=None) -> LayerNorm:
    """The official LayerNorm (see ``LayerNorm``); ``dtype`` is the output's."""
    return LayerNorm(
        dim,
        epsilon=LN_EPS,
        use_fast_variance=False,
        dtype=dtype,
        rngs=rngs,
        scale_metadata=logical("embed"),
        bias_metadata=logical("embed"),
    )


def dense(
    d_in: int, d_out: int, axes: tuple[str | None, str | None], rngs: nnx.Rngs, dtype=None
) -> nnx.Linear:
    """Linear layer with Xavier-uniform weight and zero bias, as the official init."""
    return nnx.Linear(
        d_in,
        d_out,
        dtype=dtype,
        kernel_init=xavier_uniform,
        rngs=rngs,
        kernel_metadata=logical(*axes),
        bias_metadata=logical(axes[1]),
    )


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """NHWC images [B, H, W, C] -> patch vectors [B, (H/p)*(W/p), p*p*C].

    Token order is row-major over the patch grid; inside a patch the vector is ordered
    (row offset, column offset, channel), channel fastest: the official ``patchify`` layout.
    """
    b, h, w, c = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(b, gh, patch, gw, patch, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * gw, patch * patch * c)


def unpatchify(patches: jax.Array, grid: tuple[int, int], patch: int, channels: int) -> jax.Array:
    """Inverse of ``patchify``: [B, gh*gw, p*p*C] -> NHWC [B, gh*p, gw*p, C]."""
    b, n, _ = patches.shape
    gh, gw = grid
    if gh * gw != n:
        raise ValueError(f"grid {grid} has {gh * gw} patches, got {n}")
    x = patches.reshape(b, gh, gw, patch, patch, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * patch, gw * patch, channels)


def audio_to_image(fbank: jax.Array) -> jax.Array:
    """Fbank [B, T, F] -> NHWC image [B, F (height), T (width), 1], the official transposition."""
    return jnp.swapaxes(fbank, 1, 2)[..., None]


class PatchEmbed(nnx.Module):
    """16x16 stride-16 convolution written as patchify + one matmul (exactly the same numbers).

    ``proj.kernel`` is [p*p*C, D], the official conv weight [D, C, p, p] transposed to
    [p, p, C, D] and flattened.
    """

    def __init__(self, patch: int, in_chans: int, dim: int, rngs: nnx.Rngs, dtype=None):
        self.patch = patch
        fan_in = in_chans * patch * patch
        self.proj = nnx.Linear(
            fan_in,
            dim,
            dtype=dtype,
            kernel_init=xavier_uniform,
            bias_init=symmetric_uniform(fan_in**-0.5),
            rngs=rngs,
            kernel_metadata=logical("patch", "embed"),
            bias_metadata=logical("embed"),
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        """NHWC images -> tokens [B, L, D]."""
        return self.proj(patchify(images, self.patch))


class Attention(nnx.Module):
    """Multi-head self-attention with the fused ``qkv`` layout (q|k|v) x heads x head_dim.

    Each implementation gets the projections in the layout it reads, with no transpose in
    between: the ``grouped`` TPU kernel the output of one matmul, its bias added in the
    kernel; the other TPU kernels (``attention.heads_first``) per-head einsums over the
    [D, 3, H, hd] and [H, hd, D] views of the official weights; the rest the tokens-first
    [B, N, 3, H, hd] reshape of one matmul, which runs the CPU step faster (2.56 s against 2.93
    per full-size batch-2 step)."""

    def __init__(
        self, dim: int, num_heads: int, rngs: nnx.Rngs, dtype=None, implementation: str = "auto"
    ):
        self.num_heads = num_heads
        self.implementation = implementation
        self.qkv = dense(dim, 3 * dim, ("embed", "qkv"), rngs, dtype)
        self.proj = dense(dim, dim, ("heads", "embed"), rngs, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        h = self.num_heads
        scale = (d // h) ** -0.5
        implementation = attention_lib.for_sequence(self.implementation, d, h, n)
        if implementation == "grouped":
            return self.proj(self._grouped(x, scale))
        if not attention_lib.heads_first(implementation):
            qkv = self.qkv(x).reshape(b, n, 3, h, d // h)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            out = attention_lib.dot_product_attention(q, k, v, scale, implementation)
            return self.proj(out.reshape(b, n, d))
        dtype = self.qkv.dtype or jnp.result_type(x, self.qkv.kernel[...])
        w_qkv = self.qkv.kernel[...].reshape(d, 3, h, d // h).astype(dtype)
        qkv = jnp.einsum("bnd,dthk->tbhnk", x.astype(dtype), w_qkv)
        qkv = qkv + self.qkv.bias[...].reshape(3, 1, h, 1, d // h).astype(dtype)
        out = attention_lib.dot_product_attention(qkv[0], qkv[1], qkv[2], scale, implementation)
        w_proj = self.proj.kernel[...].reshape(h, d // h, d).astype(dtype)
        out = jnp.einsum("bhnk,hkd->bnd", out.astype(dtype), w_proj)
        return out + self.proj.bias[...].astype(dtype)

    def _grouped(self, x: jax.Array, scale: float) -> jax.Array:
        """The grouped kernel's [B, N, D] output, which the remat policy keeps."""
        dtype = self.qkv.dtype or jnp.result_type(x, self.qkv.kernel[...])
        projection = x.astype(dtype) @ self.qkv.kernel[...].astype(dtype)
        head_dim = x.shape[-1] // self.num_heads
        out = grouped_attention.attention(
            projection, self.qkv.bias[...].astype(dtype), head_dim, scale
        )
        return checkpoint_name(out, attention_lib.KERNEL_RESIDUALS)


class Mlp(nnx.Module):
    """fc1 -> exact (erf) GELU -> fc2; ``implementation`` ``fused`` runs it as one TPU kernel
    each way (``fused_mlp``) where its widths fit, and where no ``tensor`` axis splits them."""

    def __init__(
        self, dim: int, hidden: int, rngs: nnx.Rngs, dtype=None, implementation: str = "auto"
    ):
        self.implementation = implementation
        self.fc1 = dense(dim, hidden, ("embed", "mlp"), rngs, dtype)
        self.fc2 = dense(hidden, dim, ("mlp", "embed"), rngs, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self._fused(x.shape):
            return self._kernel(x)
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))

    def _fused(self, shape: tuple[int, ...]) -> bool:
        implementation = self.implementation
        if implementation == "auto":
            implementation = fused_mlp.resolve(implementation, jax.default_backend())
        if implementation != "fused":
            return False
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            devices = 1
        elif mesh.shape.get("tensor", 1) > 1:
            return False
        else:
            devices = math.prod(mesh.shape[a] for a in mesh_context.batch_axes(mesh))
        tokens = math.prod(shape[:-1]) // devices
        return fused_mlp.fits(shape[-1], self.fc1.kernel.shape[-1], tokens)

    def _kernel(self, x: jax.Array) -> jax.Array:
        """The kernels' output, which the remat policy keeps (no forward kernel runs twice)."""
        dtype = self.fc1.dtype or jnp.result_type(x, self.fc1.kernel[...])
        out = fused_mlp.mlp(
            x.astype(dtype),
            self.fc1.kernel[...].astype(dtype),
            self.fc1.bias[...].astype(jnp.float32),
            self.fc2.kernel[...].astype(dtype),
            self.fc2.bias[...].astype(jnp.float32),
        )
        return checkpoint_name(out, attention_lib.KERNEL_RESIDUALS)


class Block(nnx.Module):
    """Pre-norm ViT block with three LayerNorm pairs (joint, audio, visual) and one set of weights.

    ``modality`` None uses ``norm1``/``norm2``; ``"a"`` and ``"v"`` use the ``_a``/``_v`` pairs.
    The residual stream keeps the input's dtype (the compute dtype: see ``AudioVisualEncoder``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        rngs: nnx.Rngs,
        dtype=None,
        attention: str = "auto",
        mlp: str = "auto",
    ):
        self.norm1 = layer_norm(dim, rngs, dtype)
        self.norm1_a = layer_norm(dim, rngs, dtype)
        self.norm1_v = layer_norm(dim, rngs, dtype)
        self.attn = Attention(dim, num_heads, rngs, dtype, attention)
        self.norm2 = layer_norm(dim, rngs, dtype)
        self.norm2_a = layer_norm(dim, rngs, dtype)
        self.norm2_v = layer_norm(dim, rngs, dtype)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs, dtype, mlp)

    def __call__(self, x: jax.Array, modality: str | None = None) -> jax.Array:
        suffix = "" if modality is None else f"_{modality}"
        norm1 = getattr(self, "norm1" + suffix)
        norm2 = getattr(self, "norm2" + suffix)
        with jax.named_scope("attention"):
            x = x + self.attn(norm1(x))
        with jax.named_scope("mlp"):
            return x + self.mlp(norm2(x))


def matrices_in(stacked_state, dtype):
    """The blocks' stacked matrices ([layers, in, out]) in the compute ``dtype``, cast once per
    step on their FSDP shards: the layers cast them so anyway, and the gathers, and every read
    of a gathered matrix, then move half the bytes of float32. Vectors (norms, biases) stay
    as they are."""
    if dtype is None:
        return stacked_state

    def cast(p):
        if p.ndim >= 3 and jnp.issubdtype(p.dtype, jnp.floating):
            return p.astype(dtype)
        return p

    return jax.tree.map(cast, stacked_state)


class BlockStack(nnx.Module):
    """``count`` Blocks whose parameters are stacked on a leading ``layers`` axis, run by a scan.

    One compiled block instead of ``count``; the scan also keeps XLA from fusing the residual
    gradient of all layers into every layer's backward pass (a quadratic recomputation on CPU).
    ``remat`` (see ``REMAT``) chooses what each block keeps for the backward pass: ``full``
    keeps only the [B, N, D] input of every block (least memory, about a third more compute),
    ``matmuls`` the matrix-multiply outputs (the elementwise work is recomputed where it is
    read, which saves HBM traffic on accelerators).
    """

    def __init__(
        self,
        count: int,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        rngs: nnx.Rngs,
        dtype=None,
        remat: str | bool = "auto",
        attention: str = "auto",
        mlp: str = "auto",
    ):
        self.count = count
        self.remat = remat
        self.dtype = dtype
        if count:

            @nnx.split_rngs(splits=count)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def create(rngs: nnx.Rngs) -> Block:
                return Block(dim, num_heads, mlp_ratio, rngs, dtype, attention, mlp)

            self.layers = create(rngs)

    def __len__(self) -> int:
        return self.count

    def __call__(
        self, x: jax.Array, modality: str | None = None, last_only: bool = False
    ) -> jax.Array:
        """Apply the blocks in order (``last_only``: only the last one). x [B, N, D]."""
        if not self.count:
            return x
        graphdef, state = nnx.split(self.layers)
        if last_only:
            state = jax.tree.map(lambda p: p[-1:], state)
        state = matrices_in(state, self.dtype)

        def body(carry, layer_state):
            block = nnx.merge(graphdef, mesh_context.gathered(layer_state))
            return mesh_context.split_over_batch(block(carry, modality)), None

        remat = resolve_remat(self.remat, jax.default_backend())
        if remat == "matmuls":
            policy = jax.checkpoint_policies.save_from_both_policies(
                jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                jax.checkpoint_policies.save_only_these_names(attention_lib.KERNEL_RESIDUALS),
            )
            body = jax.checkpoint(body, prevent_cse=False, policy=policy)
        elif remat == "full":
            body = jax.checkpoint(body, prevent_cse=False)
        return jax.lax.scan(body, mesh_context.split_over_batch(x), state)[0]
