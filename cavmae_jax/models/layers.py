"""Transformer building blocks with the official CAV-MAE parameter layout.

Attribute names follow the official PyTorch names (``attn.qkv``, ``mlp.fc1``, ``norm1_a``...) so
that checkpoint conversion is a rename-and-transpose table. Parameters carry logical axis names
(``embed``, ``mlp``, ``heads``, ``patch``, ``vocab``) that a sharding rules table maps to mesh axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cavmae_jax.models import mesh_context
from cavmae_jax.models.attention import dot_product_attention

LN_EPS = 1e-5  # PyTorch's nn.LayerNorm default, everywhere in the official model (behaviour 1)


def logical(*names: str | None) -> dict:
    """Variable metadata naming a parameter's logical axes (sharded later, by rules)."""
    return {"out_sharding": names, "eager_sharding": False}


xavier_uniform = nnx.initializers.xavier_uniform()


def symmetric_uniform(bound: float):
    """Initializer drawing from U(-bound, bound) (PyTorch's default conv bias init)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def layer_norm(dim: int, rngs: nnx.Rngs, dtype=None) -> nnx.LayerNorm:
    """PyTorch-exact LayerNorm: eps 1e-5 and two-pass (biased) variance."""
    return nnx.LayerNorm(
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
    """Multi-head self-attention with the fused ``qkv`` layout (q|k|v) x heads x head_dim."""

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
        qkv = self.qkv(x).reshape(b, n, 3, h, d // h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = dot_product_attention(q, k, v, (d // h) ** -0.5, self.implementation)
        return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):
    """fc1 -> exact (erf) GELU -> fc2."""

    def __init__(self, dim: int, hidden: int, rngs: nnx.Rngs, dtype=None):
        self.fc1 = dense(dim, hidden, ("embed", "mlp"), rngs, dtype)
        self.fc2 = dense(hidden, dim, ("mlp", "embed"), rngs, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
    """Pre-norm ViT block with three LayerNorm pairs (joint, audio, visual) and one set of weights.

    ``modality`` None uses ``norm1``/``norm2``; ``"a"`` and ``"v"`` use the ``_a``/``_v`` pairs.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        rngs: nnx.Rngs,
        dtype=None,
        attention: str = "auto",
    ):
        self.norm1 = layer_norm(dim, rngs)
        self.norm1_a = layer_norm(dim, rngs)
        self.norm1_v = layer_norm(dim, rngs)
        self.attn = Attention(dim, num_heads, rngs, dtype, attention)
        self.norm2 = layer_norm(dim, rngs)
        self.norm2_a = layer_norm(dim, rngs)
        self.norm2_v = layer_norm(dim, rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs, dtype)

    def __call__(self, x: jax.Array, modality: str | None = None) -> jax.Array:
        suffix = "" if modality is None else f"_{modality}"
        norm1 = getattr(self, "norm1" + suffix)
        norm2 = getattr(self, "norm2" + suffix)
        x = x + self.attn(norm1(x))
        return x + self.mlp(norm2(x))


class BlockStack(nnx.Module):
    """``count`` Blocks whose parameters are stacked on a leading ``layers`` axis, run by a scan.

    One compiled block instead of ``count``; the scan also keeps XLA from fusing the residual
    gradient of all layers into every layer's backward pass (a quadratic recomputation on CPU).
    ``remat`` recomputes each block's activations in the backward pass instead of storing them
    (only the [B, N, D] input of every block is kept): less memory for about a third more compute.
    """

    def __init__(
        self,
        count: int,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        rngs: nnx.Rngs,
        dtype=None,
        remat: bool = False,
        attention: str = "auto",
    ):
        self.count = count
        self.remat = remat
        if count:

            @nnx.split_rngs(splits=count)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def create(rngs: nnx.Rngs) -> Block:
                return Block(dim, num_heads, mlp_ratio, rngs, dtype, attention)

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

        def body(carry, layer_state):
            block = nnx.merge(graphdef, mesh_context.gathered(layer_state))
            return mesh_context.split_over_batch(block(carry, modality)), None

        if self.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        return jax.lax.scan(body, mesh_context.split_over_batch(x), state)[0]
