"""CAV-MAE losses: masked reconstruction and audio-visual contrastive (official definitions)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

CONTRAST_TEMPERATURE = 0.05


def mae_loss(pred: jax.Array, target: jax.Array, mask: jax.Array, norm_pix: bool) -> jax.Array:
    """Mean squared error over removed patches of the whole batch.

    pred, target: [B, L, P]; mask: [B, L] with 1 = removed. With ``norm_pix`` each target patch
    is standardised with its unbiased variance: (t - mean) / sqrt(var + 1e-6) (official
    behaviour 11).
    """
    pred = pred.astype(jnp.float32)
    target = target.astype(jnp.float32)
    if norm_pix:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True, ddof=1)
        target = (target - mean) / jnp.sqrt(var + 1e-6)
    per_patch = jnp.mean((pred - target) ** 2, axis=-1)
    return jnp.sum(per_patch * mask) / jnp.sum(mask)


def l2_normalize(x: jax.Array) -> jax.Array:
    """Rows divided by max(||x||, 1e-12), as torch.nn.functional.normalize."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _nce_columns(sim: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each column j classifies the rows: loss -mean_j log_softmax(S, 0)[j, j] and accuracy."""
    log_probs = jax.nn.log_softmax(sim, axis=0)
    loss = -jnp.mean(jnp.diagonal(log_probs))
    acc = jnp.mean(jnp.argmax(sim, axis=0) == jnp.arange(sim.shape[0]))
    return loss, acc.astype(jnp.float32)


def contrastive_loss(
    audio_rep: jax.Array, video_rep: jax.Array, bidirectional: bool = False
) -> tuple[jax.Array, jax.Array]:
    """InfoNCE between pooled audio [B, D] and visual [B, D] representations.

    S = norm(a) norm(v)^T / 0.05. Single direction (official default): each video picks its audio
    among the batch's audios (softmax over axis 0). Bidirectional averages both directions.
    Returns (loss, accuracy).
    """
    a = l2_normalize(audio_rep.astype(jnp.float32))
    v = l2_normalize(video_rep.astype(jnp.float32))
    sim = a @ v.T / CONTRAST_TEMPERATURE
    loss, acc = _nce_columns(sim)
    if bidirectional:
        loss_t, acc_t = _nce_columns(sim.T)
        loss, acc = (loss + loss_t) / 2, (acc + acc_t) / 2
    return loss, acc


def grouped_contrastive_loss(
    audio_rep: jax.Array, video_rep: jax.Array, groups: int, bidirectional: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Contrastive loss on G contiguous equal groups of the batch: losses summed, accuracy averaged.

    G=4 reproduces the official 4-replica DataParallel pretraining (negatives per quarter batch).
    """
    batch, dim = audio_rep.shape
    if batch % groups:
        raise ValueError(f"batch {batch} does not split into {groups} contrastive groups")
    a = audio_rep.reshape(groups, batch // groups, dim)
    v = video_rep.reshape(groups, batch // groups, dim)
    losses, accs = jax.vmap(lambda x, y: contrastive_loss(x, y, bidirectional))(a, v)
    return jnp.sum(losses), jnp.mean(accs)


def binary_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``BCEWithLogitsLoss``: mean over batch x classes of soft-target binary cross-entropy
    (the AudioSet finetuning loss). logits, targets: [B, K]."""
    logits = logits.astype(jnp.float32)
    return jnp.mean(jax.nn.softplus(logits) - targets * logits)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``CrossEntropyLoss`` with probability targets: batch mean of -sum_k t_k log softmax(z)_k
    (the VGGSound finetuning loss; the official soft targets need not sum to 1)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.sum(targets * log_probs, axis=-1))


CLASSIFICATION_LOSSES = {"bce": binary_cross_entropy, "ce": soft_cross_entropy}


# PCAV-MAE prototype losses (docs/pcavmae.md) ----------------------------------------------------


def prototype_nce(
    similarity: jax.Array, gamma: jax.Array, targets: jax.Array, valid: jax.Array | None = None
) -> jax.Array:
    """ProtoNCE of one granularity: mean over clips of -log softmax_k(s_bk / gamma_k) at the
    clip's prototype. similarity [B, K], gamma [K], targets [B] (int), valid [K] (padding)."""
    logits = similarity.astype(jnp.float32) / gamma
    if valid is not None:
        logits = jnp.where(valid, logits, -jnp.inf)
    positive = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - positive)


def pje_loss(
    audio: jax.Array,
    proto_visual: jax.Array,
    gamma: jax.Array,
    targets: jax.Array,
    valid: jax.Array,
    tau: float,
) -> jax.Array:
    """Eq. (1), L_PJE: each clip's visible-audio representation [B, D] against the visual
    prototypes [G, K, D], positive = the prototype of the clip's own video; mean over the G
    granularities, scaled by 1 / tau."""
    audio = l2_normalize(audio.astype(jnp.float32))
    per_level = jax.vmap(lambda p, g, t, m: prototype_nce(audio @ p.T, g, t, m))
    return jnp.mean(per_level(proto_visual, gamma, targets, valid)) / tau


def pcpe_loss(
    masked_audio: jax.Array,
    masked_visual: jax.Array,
    proto_audio: jax.Array,
    proto_visual: jax.Array,
    gamma: jax.Array,
    targets: jax.Array,
    valid: jax.Array,
    tau: float,
) -> jax.Array:
    """Eq. (3), L_PCPE: the decoder's masked-patch features of both modalities [B, D], audio
    against audio prototypes plus visual against visual prototypes, summed in the exponent."""
    masked_audio = l2_normalize(masked_audio.astype(jnp.float32))
    masked_visual = l2_normalize(masked_visual.astype(jnp.float32))

    def level(pa, pv, g, t, m):
        return prototype_nce(masked_audio @ pa.T + masked_visual @ pv.T, g, t, m)

    return jnp.mean(jax.vmap(level)(proto_audio, proto_visual, gamma, targets, valid)) / tau
