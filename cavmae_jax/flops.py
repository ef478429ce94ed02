"""Analytic FLOP counts (multiply-add = 2 FLOPs) of the CAV-MAE forward and training passes."""

from __future__ import annotations

from cavmae_jax.models.config import ModelConfig
from cavmae_jax.models.masking import num_kept


def linear(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def block(tokens: int, dim: int, mlp_ratio: float) -> int:
    """qkv, scores, attention-weighted values, proj, fc1, fc2 of one transformer block."""
    hidden = int(dim * mlp_ratio)
    attention = 2 * 2 * tokens * tokens * dim
    return (
        linear(tokens, dim, 3 * dim)
        + attention
        + linear(tokens, dim, dim)
        + linear(tokens, dim, hidden)
        + linear(tokens, hidden, dim)
    )


def _lengths(cfg: ModelConfig) -> tuple[int, int]:
    (fa, ta), (hv, wv) = cfg.audio_grid, cfg.visual_grid
    return fa * ta, hv * wv


def pretrain_forward(cfg: ModelConfig, ratio_a: float = 0.75, ratio_v: float = 0.75) -> int:
    """One clip through ``CAVMAE.__call__`` (masked encoder, streams, decoder, heads)."""
    len_a, len_v = _lengths(cfg)
    keep_a, keep_v = num_kept(len_a, ratio_a), num_kept(len_v, ratio_v)
    d, mlp, p = cfg.embed_dim, cfg.mlp_ratio, cfg.patch_size
    total = linear(len_a, p * p, d) + linear(len_v, p * p * cfg.in_chans, d)
    total += cfg.modality_specific_depth * (block(keep_a, d, mlp) + block(keep_v, d, mlp))
    total += cfg.shared_depth * block(keep_a + keep_v, d, mlp)
    if cfg.contrast_loss_weight and cfg.shared_depth:
        stream_depth = cfg.shared_depth if cfg.chain_shared_blocks else 1
        total += stream_depth * (block(keep_a, d, mlp) + block(keep_v, d, mlp))
    if cfg.decoder_depth and cfg.mae_loss_weight:
        dd = cfg.decoder_embed_dim
        total += linear(keep_a + keep_v, d, dd)
        total += cfg.decoder_depth * block(len_a + len_v, dd, mlp)
        total += linear(len_a, dd, p * p) + linear(len_v, dd, p * p * cfg.in_chans)
    return total


def pretrain_step(cfg: ModelConfig, ratio_a: float = 0.75, ratio_v: float = 0.75) -> int:
    """Forward + backward of one clip: the usual 3x the forward count."""
    return 3 * pretrain_forward(cfg, ratio_a, ratio_v)


def features_forward(cfg: ModelConfig) -> int:
    """One clip through ``forward_feat`` (unmasked, modality-specific streams)."""
    len_a, len_v = _lengths(cfg)
    d, mlp, p = cfg.embed_dim, cfg.mlp_ratio, cfg.patch_size
    total = linear(len_a, p * p, d) + linear(len_v, p * p * cfg.in_chans, d)
    return total + cfg.depth * (block(len_a, d, mlp) + block(len_v, d, mlp))


def finetune_forward(cfg: ModelConfig, mode: str = "multimodal") -> int:
    """One clip through ``CAVMAEFT`` in ``mode`` (unmasked encoder and the classifier head)."""
    len_a, len_v = _lengths(cfg)
    d, mlp, p, msd = cfg.embed_dim, cfg.mlp_ratio, cfg.patch_size, cfg.modality_specific_depth
    audio = linear(len_a, p * p, d) + msd * block(len_a, d, mlp)
    visual = linear(len_v, p * p * cfg.in_chans, d) + msd * block(len_v, d, mlp)
    shared = {
        "multimodal": (audio + visual, block(len_a + len_v, d, mlp)),
        "audioonly": (audio, block(len_a, d, mlp)),
        "videoonly": (visual, block(len_v, d, mlp)),
        "missingaudioonly": (audio, 2 * block(len_a, d, mlp)),
        "missingvideoonly": (visual, 2 * block(len_v, d, mlp)),
        "multimodal_sum": (
            audio + visual,
            block(len_a + len_v, d, mlp) + block(len_a, d, mlp) + block(len_v, d, mlp),
        ),
    }
    encoders, shared_block = shared[mode]
    return encoders + cfg.shared_depth * shared_block + head_forward(cfg)


def head_forward(cfg: ModelConfig) -> int:
    """The classifier head's linear layer on one clip's pooled feature."""
    return linear(1, cfg.embed_dim, cfg.label_dim)


def finetune_step(cfg: ModelConfig, mode: str = "multimodal", freeze_base: bool = False) -> int:
    """Forward + backward of one clip in finetuning ``mode``; with a frozen base the backward
    pass runs through the head alone."""
    if freeze_base:
        return finetune_forward(cfg, mode) + 2 * head_forward(cfg)
    return 3 * finetune_forward(cfg, mode)
