"""The audio-visual encoder shared by the pretraining and finetuning models.

Parameter names follow the official checkpoints: ``patch_embed_a``, ``modality_a``,
``pos_embed_a``, ``blocks_a``, ``blocks_v``, ``blocks_u``, ``norm_a``, ``norm_v``, ``norm``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cavmae_jax.models.config import ModelConfig
from cavmae_jax.models.layers import (
    BlockStack,
    PatchEmbed,
    audio_to_image,
    layer_norm,
    logical,
    patchify,
)
from cavmae_jax.models.posemb import sincos_2d


class FixedParam(nnx.Variable):
    """A stored but non-trainable parameter (fixed position tables): not an ``nnx.Param``."""


def position_table(dim: int, grid: tuple[int, int], trainable: bool) -> nnx.Variable:
    """Sin-cos table [1, rows*cols, dim] as a trainable ``Param`` or a ``FixedParam``."""
    kind = nnx.Param if trainable else FixedParam
    return kind(jnp.asarray(sincos_2d(dim, *grid))[None], **logical(None, None, "embed"))


def token_param(rngs: nnx.Rngs, dim: int) -> nnx.Param:
    """A learned [1, 1, dim] token, N(0, 0.02) as the official init."""
    return nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (1, 1, dim)), **logical(None, None, "embed")
    )


def block_stack(cfg: ModelConfig, count: int, rngs: nnx.Rngs) -> BlockStack:
    return BlockStack(
        count,
        cfg.embed_dim,
        cfg.num_heads,
        cfg.mlp_ratio,
        rngs,
        cfg.compute_dtype,
        cfg.remat,
        cfg.attention,
        cfg.mlp,
    )


class AudioVisualEncoder(nnx.Module):
    """Patch embeddings, modality-specific stacks and the shared stack with its three norms.

    ``visual=False`` builds the audio-only subset (the official ``CAVMAEFTAudio``).
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, visual: bool = True):
        self.cfg = cfg
        d, dtype, msd = cfg.embed_dim, cfg.compute_dtype, cfg.modality_specific_depth
        self.patch_embed_a = PatchEmbed(cfg.patch_size, 1, d, rngs, dtype)
        self.modality_a = token_param(rngs, d)
        self.pos_embed_a = position_table(d, cfg.audio_grid, cfg.tr_pos)
        self.blocks_a = block_stack(cfg, msd, rngs)
        if visual:
            self.patch_embed_v = PatchEmbed(cfg.patch_size, cfg.in_chans, d, rngs, dtype)
            self.modality_v = token_param(rngs, d)
            self.pos_embed_v = position_table(d, cfg.visual_grid, cfg.tr_pos)
            self.blocks_v = block_stack(cfg, msd, rngs)
        self.blocks_u = block_stack(cfg, cfg.shared_depth, rngs)
        self.norm_a = layer_norm(d, rngs)
        if visual:
            self.norm_v = layer_norm(d, rngs)
        self.norm = layer_norm(d, rngs)

    # Embeddings --------------------------------------------------------------------------------

    def audio_patches(self, audio: jax.Array) -> jax.Array:
        """Fbank [B, T, F] -> patch vectors [B, 512, 256]: token n = f*64 + t (official
        behaviour 3)."""
        expected = (self.cfg.audio_length, self.cfg.num_mel_bins)
        if audio.ndim != 3 or audio.shape[1:] != expected:
            raise ValueError(
                f"audio must be [batch, {expected[0]} frames, {expected[1]} mel bins] to match "
                f"the position table (pad or crop the fbank), got {audio.shape}"
            )
        return patchify(audio_to_image(audio), self.cfg.patch_size)

    def visual_patches(self, image: jax.Array) -> jax.Array:
        """NHWC image [B, 224, 224, 3] -> patch vectors [B, 196, 768]."""
        size, chans = self.cfg.img_size, self.cfg.in_chans
        if image.ndim != 4 or image.shape[1:] != (size, size, chans):
            raise ValueError(
                f"image must be NHWC [batch, {size}, {size}, {chans}], got {image.shape}"
            )
        return patchify(image, self.cfg.patch_size)

    def embed_audio(self, patches: jax.Array) -> jax.Array:
        """Patch vectors -> tokens [B, L, D] in the compute dtype: the residual stream of every
        block stays in it (float32 or bfloat16), the final norms return float32."""
        with jax.named_scope("patch_embed"):
            x = self.patch_embed_a.proj(patches) + self.pos_embed_a[...]
            return (x + self.modality_a[...]).astype(self.cfg.compute_dtype)

    def embed_visual(self, patches: jax.Array) -> jax.Array:
        with jax.named_scope("patch_embed"):
            x = self.patch_embed_v.proj(patches) + self.pos_embed_v[...]
            return (x + self.modality_v[...]).astype(self.cfg.compute_dtype)

    # Streams -----------------------------------------------------------------------------------

    def joint_stream(self, x: jax.Array) -> jax.Array:
        """Shared blocks with the joint norms, then ``norm``."""
        with jax.named_scope("joint"):
            return self.norm(self.blocks_u(x))

    def modality_stream(self, x: jax.Array, modality: str, chain: bool = True) -> jax.Array:
        """Shared blocks with the ``_a``/``_v`` norms, then ``norm_a``/``norm_v``.

        ``chain=False`` is the official pretraining loop: every shared block is applied to the
        branch output and only the last result is kept.
        """
        with jax.named_scope(f"stream_{modality}"):
            x = self.blocks_u(x, modality, last_only=not chain)
            return getattr(self, f"norm_{modality}")(x)

    def audio_branch(self, tokens: jax.Array) -> jax.Array:
        """Audio tokens [B, N, D] through the audio-specific blocks."""
        with jax.named_scope("encoder_a"):
            return self.blocks_a(tokens)

    def visual_branch(self, tokens: jax.Array) -> jax.Array:
        with jax.named_scope("encoder_v"):
            return self.blocks_v(tokens)

    def encode_audio(self, audio: jax.Array) -> jax.Array:
        """Unmasked fbank [B, T, F] -> audio-branch output [B, 512, D] (before shared blocks)."""
        return self.audio_branch(self.embed_audio(self.audio_patches(audio)))

    def encode_visual(self, image: jax.Array) -> jax.Array:
        return self.visual_branch(self.embed_visual(self.visual_patches(image)))

    def features(
        self, audio: jax.Array, image: jax.Array | None, joint: bool = True
    ) -> dict[str, jax.Array]:
        """Unmasked token features of clips, the one source of every embedding: ``audio`` [B,
        512, D] and ``visual`` [B, 196, D] (the modality streams: the official retrieval
        features) and, with ``joint``, ``joint`` [B, 708, D] (the shared blocks over both token
        sets, what the multimodal classifier pools); a model without visual parameters gives
        ``audio`` only."""
        encoded_a = self.encode_audio(audio)
        out = {"audio": self.modality_stream(encoded_a, "a")}
        if hasattr(self, "patch_embed_v") and image is not None:
            encoded_v = self.encode_visual(image)
            out["visual"] = self.modality_stream(encoded_v, "v")
            if joint:
                both = jnp.concatenate([encoded_a, encoded_v], axis=1)
                out["joint"] = self.joint_stream(both)
        return out

    def forward_feat(self, audio: jax.Array, image: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Unmasked token features (modality-specific norms): [B, 512, D], [B, 196, D]."""
        feat_a = self.modality_stream(self.encode_audio(audio), "a")
        feat_v = self.modality_stream(self.encode_visual(image), "v")
        return feat_a, feat_v
