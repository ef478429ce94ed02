"""PCAV-MAE: prototypical contrastive audio-visual masked autoencoder (docs/pcavmae.md).

The CAV-MAE encoder (11 modality-specific layers per modality, one joint layer, 768 wide) and a
shallower decoder (4 layers, 384 wide, 6 heads, MLP 1536), masking 50% of audio and 75% of visual
tokens. CAV-MAE's instance contrast is replaced by prototypes: eq. (1) pulls each clip's
visible-audio representation towards the visual prototype of its own video; eq. (3) pulls the
decoder's features of the masked patches towards the clip's audio and visual prototypes; eq. (4)
reconstructs the masked patches. Prototypes, their concentrations and each clip's prototype come
from outside the model (``cavmae_jax/prototypes.py`` on the momentum encoder's features).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cavmae_jax import losses
from cavmae_jax.models.cav_mae import CAVMAE
from cavmae_jax.models.config import ModelConfig
from cavmae_jax.models.layers import dense

# The paper's sizes (section 3.2) where they differ from CAV-MAE's
PAPER_SIZES = dict(
    modality_specific_depth=11,
    decoder_embed_dim=384,
    decoder_depth=4,
    decoder_num_heads=6,
    mlp_ratio=4.0,
    norm_pix_loss=True,
    contrast_loss_weight=1.0,  # builds the modality streams that feed eq. (1)
)


def pcav_config(**changes) -> ModelConfig:
    """The paper's sizes on ``ModelConfig``."""
    return ModelConfig(**{**PAPER_SIZES, **changes})


def masked_mean(tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over the masked (removed, mask = 1) tokens: [B, L, D], [B, L] -> [B, D]."""
    mask = mask.astype(tokens.dtype)[..., None]
    return jnp.sum(tokens * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


class PCAVMAE(CAVMAE):
    """PCAV-MAE pretraining model; ``proto_proj_a/v`` map masked-patch decoder features into the
    encoder space where the prototypes live (the paper leaves this map implicit)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        if not cfg.decoder_depth or not cfg.contrast_loss_weight:
            raise ValueError("PCAV-MAE needs a decoder and the modality streams")
        super().__init__(cfg, rngs)
        dd, d = cfg.decoder_embed_dim, cfg.embed_dim
        self.proto_proj_a = dense(dd, d, ("decoder", "embed"), rngs, cfg.compute_dtype)
        self.proto_proj_v = dense(dd, d, ("decoder", "embed"), rngs, cfg.compute_dtype)

    def clip_embeddings(self, audio: jax.Array, image: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Unmasked clip embeddings (modality streams, mean over tokens, unit norm): the
        features that are clustered. [B, D] each."""
        tokens = self.features(audio, image, joint=False)
        audio, visual = (
            tokens[name].mean(axis=1).astype(jnp.float32) for name in ("audio", "visual")
        )
        return losses.l2_normalize(audio), losses.l2_normalize(visual)

    def __call__(
        self,
        audio: jax.Array,
        image: jax.Array,
        protos: dict[str, jax.Array],
        targets: jax.Array,
        *,
        key: jax.Array,
        mask_ratio_a: float = 0.5,
        mask_ratio_v: float = 0.75,
        tau: float = 0.1,
        use_decoder: bool = True,
        pje_weight: float = 1.0,
        pcpe_weight: float = 1.0,
        use_prototypes: bool = True,
        symmetric_pje: bool = False,
        infonce_weight: float = 0.0,
    ) -> dict[str, jax.Array]:
        """Losses of one batch. ``protos``: ``audio``/``visual`` [G, K, D] (unit rows),
        ``gamma`` [G, K], ``valid`` [G, K]; ``targets`` [G, B]: each clip's prototype per
        granularity. ``tau`` divides eqs. (1) and (3) (1: no such factor). ``use_decoder``
        False drops eqs. (3) and (4) (encoder-only phase); ``use_prototypes`` False drops eqs.
        (1) and (3) (warm-up); the weights scale eqs. (1) and (3) in the total (0: the
        ablations without them). ``symmetric_pje`` averages eq. (1) with its mirror image
        (visible visual tokens against the audio prototypes), so that the visual stream
        learns; ``infonce_weight`` adds CAV-MAE's contrastive loss of the two streams."""
        cfg = self.cfg
        key_a, key_v = jax.random.split(key)
        batch = audio.shape[0]
        noise_a = jax.random.uniform(key_a, (batch, cfg.audio_grid[0] * cfg.audio_grid[1]))
        noise_v = jax.random.uniform(key_v, (batch, cfg.visual_grid[0] * cfg.visual_grid[1]))
        patches_a, patches_v = self.audio_patches(audio), self.visual_patches(image)
        latent, stream_a, stream_v, masked_a, masked_v = self.forward_encoder(
            patches_a, patches_v, noise_a, noise_v, mask_ratio_a, mask_ratio_v
        )
        visible_a, visible_v = stream_a.mean(axis=1), stream_v.mean(axis=1)
        zero = jnp.zeros((), jnp.float32)
        loss_pje = loss_pcpe = loss_mae_a = loss_mae_v = loss_c = p_acc = zero
        if use_prototypes:
            gamma, valid = protos["gamma"], protos["valid"]
            loss_pje = losses.pje_loss(visible_a, protos["visual"], gamma, targets, valid, tau)
            if symmetric_pje:
                mirror = losses.pje_loss(visible_v, protos["audio"], gamma, targets, valid, tau)
                loss_pje = 0.5 * (loss_pje + mirror)
            sims = jnp.einsum("bd,gkd->gbk", visible_a, protos["visual"])
            hits = jnp.argmax(jnp.where(valid[:, None], sims, -jnp.inf), -1) == targets
            p_acc = jnp.mean(hits.astype(jnp.float32))
        if infonce_weight:
            loss_c, _ = losses.contrastive_loss(visible_a, visible_v, cfg.bidirect_contrast)
        if use_decoder:
            tokens_a, tokens_v = self.decoder_tokens(latent, masked_a, masked_v)
            loss_mae_a = losses.mae_loss(
                self.decoder_pred_a(tokens_a), patches_a, masked_a.mask, cfg.norm_pix_loss
            )
            loss_mae_v = losses.mae_loss(
                self.decoder_pred_v(tokens_v), patches_v, masked_v.mask, cfg.norm_pix_loss
            )
        if use_decoder and use_prototypes:
            loss_pcpe = losses.pcpe_loss(
                self.proto_proj_a(masked_mean(tokens_a, masked_a.mask)),
                self.proto_proj_v(masked_mean(tokens_v, masked_v.mask)),
                protos["audio"],
                protos["visual"],
                protos["gamma"],
                targets,
                protos["valid"],
                tau,
            )
        loss_r = loss_mae_a + loss_mae_v
        total = pje_weight * loss_pje + pcpe_weight * loss_pcpe + loss_r + infonce_weight * loss_c
        return {
            "loss": total,
            "loss_pje": loss_pje,
            "loss_pcpe": loss_pcpe,
            "loss_r": loss_r,
            "loss_c": loss_c,
            "loss_mae_a": loss_mae_a,
            "loss_mae_v": loss_mae_v,
            "p_acc": p_acc,
            "mask_a": masked_a.mask,
            "mask_v": masked_v.mask,
        }


def clip_prototypes(
    audio: jax.Array,
    visual: jax.Array,
    proto_audio: jax.Array,
    proto_visual: jax.Array,
    valid: jax.Array,
) -> jax.Array:
    """Each clip's prototype per granularity [G, B]: the nearest prototype of its joint
    (audio + visual) momentum embedding. Inputs: [B, D] x2, [G, K, D] x2, [G, K]."""
    sims = jnp.einsum(
        "bd,gkd->gbk",
        losses.l2_normalize(audio + visual),
        losses.l2_normalize(proto_audio + proto_visual),
    )
    return jnp.argmax(jnp.where(valid[:, None], sims, -jnp.inf), axis=-1).astype(jnp.int32)


def ema_update(ema, params, momentum: float):
    """Momentum encoder: ema <- m * ema + (1 - m) * params (every parameter)."""
    return jax.tree.map(lambda e, p: momentum * e + (1 - momentum) * p, ema, params)
