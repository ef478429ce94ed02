"""Finetuning / inference models: ``CAVMAEFT`` (all official modes) and ``CAVMAEFTAudio``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cavmae_jax.models.config import ModelConfig
from cavmae_jax.models.encoder import AudioVisualEncoder
from cavmae_jax.models.layers import dense, layer_norm

FT_MODES = ("multimodal", "audioonly", "videoonly", "missingaudioonly", "missingvideoonly")
# PCAV-MAE's option (no official counterpart): multimodal plus both single-modality streams
SUM_MODE = "multimodal_sum"


def classifier_head(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.List:
    """``mlp_head``: LayerNorm then Linear(D -> label_dim), official names ``mlp_head.0/1``."""
    return nnx.List(
        [
            layer_norm(cfg.embed_dim, rngs),
            dense(cfg.embed_dim, cfg.label_dim, ("embed", "classes"), rngs, cfg.compute_dtype),
        ]
    )


def apply_head(head: nnx.List, pooled: jax.Array) -> jax.Array:
    norm, linear = head
    with jax.named_scope("head"):
        return linear(norm(pooled)).astype(jnp.float32)


class CAVMAEFT(AudioVisualEncoder):
    """Audio-visual classifier (official ``CAVMAEFT``; it trains its positions: ``tr_pos=True``)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        super().__init__(cfg, rngs)
        self.mlp_head = classifier_head(cfg, rngs)

    def pooled(self, audio: jax.Array, image: jax.Array, mode: str = "multimodal") -> jax.Array:
        """Mean-pooled representation [B, D] that feeds the head, for each official mode."""
        if mode in ("multimodal", SUM_MODE):
            a, v = self.encode_audio(audio), self.encode_visual(image)
            pooled = self.joint_stream(jnp.concatenate([a, v], axis=1)).mean(axis=1)
            if mode == SUM_MODE:
                pooled += self.modality_stream(a, "a").mean(axis=1)
                pooled += self.modality_stream(v, "v").mean(axis=1)
            return pooled
        if mode == "audioonly":
            return self.modality_stream(self.encode_audio(audio), "a").mean(axis=1)
        if mode == "videoonly":
            return self.modality_stream(self.encode_visual(image), "v").mean(axis=1)
        if mode in ("missingaudioonly", "missingvideoonly"):
            present = "a" if mode == "missingaudioonly" else "v"
            x = self.encode_audio(audio) if present == "a" else self.encode_visual(image)
            joint = self.joint_stream(x).mean(axis=1)
            specific = self.modality_stream(x, present).mean(axis=1)
            return (joint + specific) / 2
        raise ValueError(
            f"unknown finetuning mode {mode!r}; expected one of {(*FT_MODES, SUM_MODE)}"
        )

    def __call__(self, audio: jax.Array, image: jax.Array, mode: str = "multimodal") -> jax.Array:
        """Logits [B, label_dim]."""
        return apply_head(self.mlp_head, self.pooled(audio, image, mode))

    def forward_feat(self, audio: jax.Array, image: jax.Array, mode: str = "av"):
        """``av``: (audio tokens, visual tokens); ``a``: audio tokens; ``v``: visual tokens."""
        if mode == "av":
            return super().forward_feat(audio, image)
        if mode == "a":
            return self.modality_stream(self.encode_audio(audio), "a")
        if mode == "v":
            return self.modality_stream(self.encode_visual(image), "v")
        raise ValueError(f"unknown feature mode {mode!r}; expected 'av', 'a' or 'v'")


class CAVMAEFTAudio(AudioVisualEncoder):
    """Audio-only classifier (official ``CAVMAEFTAudio``): no visual parameters."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        super().__init__(cfg, rngs, visual=False)
        self.mlp_head = classifier_head(cfg, rngs)

    def forward_feat(self, audio: jax.Array, image: jax.Array | None = None, mode: str = "a"):
        """Audio tokens [B, 512, D] (``image`` and ``mode`` are accepted and ignored)."""
        return self.modality_stream(self.encode_audio(audio), "a")

    def __call__(self, audio: jax.Array, image: jax.Array | None = None, mode: str = "audioonly"):
        """Logits [B, label_dim] from audio alone."""
        return apply_head(self.mlp_head, self.forward_feat(audio).mean(axis=1))
