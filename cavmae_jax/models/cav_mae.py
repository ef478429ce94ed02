"""CAVMAE: the pretraining model (encoder, joint and modality streams, decoder, losses).

Variants by configuration (see ``ModelConfig``): CAV-MAE, vanilla AV-MAE, CAV, any
``modality_specific_depth``, bidirectional contrast, ``norm_pix_loss``, fixed or trained positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cavmae_jax import losses
from cavmae_jax.models import masking
from cavmae_jax.models.config import ModelConfig
from cavmae_jax.models.encoder import AudioVisualEncoder, position_table, token_param
from cavmae_jax.models.layers import BlockStack, dense, layer_norm


def restore_order(kept: jax.Array, ids_restore: jax.Array, mask_token: jax.Array) -> jax.Array:
    """Append mask tokens to kept tokens [B, K, D] and unshuffle to positional order [B, L, D]."""
    b, k, d = kept.shape
    length = ids_restore.shape[1]
    with jax.named_scope("unshuffle"):
        fill = jnp.broadcast_to(mask_token.astype(kept.dtype), (b, length - k, d))
        shuffled = jnp.concatenate([kept, fill], axis=1)
        return jnp.take_along_axis(shuffled, ids_restore[..., None], axis=1)


def mask_noise(
    cfg: ModelConfig, key: jax.Array, clips: int, mask_ratio_a: float, mask_mode: str
) -> dict[str, jax.Array]:
    """The random scores ``noise_a`` [clips, La], ``noise_v`` [clips, Lv] whose lowest entries
    pick the visible patches (audio: of ``mask_mode``)."""
    key_a, key_v = jax.random.split(key)
    grid_a, grid_v = cfg.audio_grid, cfg.visual_grid
    return {
        "noise_a": masking.audio_noise(key_a, clips, grid_a, mask_ratio_a, mask_mode),
        "noise_v": jax.random.uniform(key_v, (clips, grid_v[0] * grid_v[1])),
    }


def pooled_streams(out: dict) -> tuple[jax.Array, jax.Array]:
    """The clip representations the contrastive loss compares: the modality streams' token
    means [B, D]."""
    return out["latent_c_a"].mean(axis=1), out["latent_c_v"].mean(axis=1)


def contrastive_term(cfg: ModelConfig, pooled_a, pooled_v) -> tuple[jax.Array, jax.Array]:
    """The weighted contrastive loss over the clips given (in ``cfg.loss_groups`` contiguous
    groups) and its accuracy."""
    loss_c, c_acc = losses.grouped_contrastive_loss(
        pooled_a, pooled_v, cfg.loss_groups, cfg.bidirect_contrast
    )
    return cfg.contrast_loss_weight * loss_c, c_acc


class CAVMAE(AudioVisualEncoder):
    """Contrastive audio-visual masked autoencoder (official ``CAVMAE``)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        super().__init__(cfg, rngs)
        if cfg.decoder_depth:
            dd, dtype = cfg.decoder_embed_dim, cfg.compute_dtype
            p = cfg.patch_size
            self.mask_token = token_param(rngs, dd)
            self.decoder_modality_a = token_param(rngs, dd)
            self.decoder_modality_v = token_param(rngs, dd)
            self.decoder_pos_embed_a = position_table(dd, cfg.audio_grid, cfg.tr_pos)
            self.decoder_pos_embed_v = position_table(dd, cfg.visual_grid, cfg.tr_pos)
            self.decoder_embed = dense(cfg.embed_dim, dd, ("embed", "decoder"), rngs, dtype)
            self.decoder_blocks = BlockStack(
                cfg.decoder_depth,
                dd,
                cfg.decoder_num_heads,
                cfg.mlp_ratio,
                rngs,
                dtype,
                cfg.remat,
                cfg.attention,
                cfg.mlp,
            )
            self.decoder_norm = layer_norm(dd, rngs)
            self.decoder_pred_a = dense(dd, p * p, ("decoder", "patch"), rngs, dtype)
            self.decoder_pred_v = dense(dd, p * p * cfg.in_chans, ("decoder", "patch"), rngs, dtype)

    def forward_encoder(self, patches_a, patches_v, noise_a, noise_v, ratio_a, ratio_v):
        """Masked encoder. Returns the joint latent [B, Ka+Kv, D], the modality-stream outputs
        (None when the contrastive loss is off) and the two ``Masking`` results."""
        cfg = self.cfg
        masked_a = masking.apply_mask(self.embed_audio(patches_a), noise_a, ratio_a)
        masked_v = masking.apply_mask(self.embed_visual(patches_v), noise_v, ratio_v)
        a = self.audio_branch(masked_a.kept)
        v = self.visual_branch(masked_v.kept)
        latent = self.joint_stream(jnp.concatenate([a, v], axis=1))
        latent_c_a = latent_c_v = None
        if cfg.contrast_loss_weight:
            latent_c_a = self.modality_stream(a, "a", cfg.chain_shared_blocks)
            latent_c_v = self.modality_stream(v, "v", cfg.chain_shared_blocks)
        return latent, latent_c_a, latent_c_v, masked_a, masked_v

    def forward_decoder(self, latent, masked_a, masked_v) -> tuple[jax.Array, jax.Array]:
        """Joint latent [B, Ka+Kv, D] -> predictions [B, 512, 256] and [B, 196, 768]."""
        xa, xv = self.decoder_tokens(latent, masked_a, masked_v)
        with jax.named_scope("decoder"):
            return self.decoder_pred_a(xa), self.decoder_pred_v(xv)

    def decoder_tokens(self, latent, masked_a, masked_v) -> tuple[jax.Array, jax.Array]:
        """Normalised decoder outputs in positional order: audio [B, 512, Dd], visual
        [B, 196, Dd] (mask tokens filled in, decoder positions and modality tokens added)."""
        with jax.named_scope("decoder"):
            return self._decoder_tokens(latent, masked_a, masked_v)

    def _decoder_tokens(self, latent, masked_a, masked_v) -> tuple[jax.Array, jax.Array]:
        x = self.decoder_embed(latent.astype(self.cfg.compute_dtype))
        keep_a = masked_a.kept.shape[1]
        token = self.mask_token[...]
        xa = restore_order(x[:, :keep_a], masked_a.ids_restore, token)
        xv = restore_order(x[:, keep_a:], masked_v.ids_restore, token)
        len_a = xa.shape[1]
        pos = jnp.concatenate([self.decoder_pos_embed_a[...], self.decoder_pos_embed_v[...]], 1)
        x = jnp.concatenate([xa, xv], axis=1) + pos
        x = jnp.concatenate(
            [
                x[:, :len_a] + self.decoder_modality_a[...],
                x[:, len_a:] + self.decoder_modality_v[...],
            ],
            axis=1,
        ).astype(self.cfg.compute_dtype)
        x = self.decoder_norm(self.decoder_blocks(x))
        return x[:, :len_a], x[:, len_a:]

    def __call__(
        self,
        audio: jax.Array,
        image: jax.Array,
        *,
        key: jax.Array | None = None,
        noise_a: jax.Array | None = None,
        noise_v: jax.Array | None = None,
        mask_ratio_a: float = 0.75,
        mask_ratio_v: float = 0.75,
        mask_mode: str = "unstructured",
    ) -> dict[str, jax.Array]:
        """Masked forward pass and losses. audio [B, T, F], image [B, H, W, 3] (NHWC).

        Masks come from ``noise_a``/``noise_v`` [B, L] when given, else are drawn with ``key``.
        Returns loss, loss_mae, loss_mae_a, loss_mae_v, loss_c (weighted), c_acc, mask_a, mask_v,
        pred_a, pred_v (with a decoder), latent, latent_c_a, latent_c_v (with the contrastive loss).
        With ``loss_groups`` G > 1 every loss is the sum of the G group losses and c_acc
        their mean, as the official DataParallel run.
        """
        cfg = self.cfg
        if noise_a is None or noise_v is None:
            if key is None:
                raise ValueError("CAVMAE needs either noise_a and noise_v, or a PRNG key")
            drawn = mask_noise(cfg, key, audio.shape[0], mask_ratio_a, mask_mode)
            noise_a = drawn["noise_a"] if noise_a is None else noise_a
            noise_v = drawn["noise_v"] if noise_v is None else noise_v
        patches_a = self.audio_patches(audio)
        patches_v = self.visual_patches(image)
        latent, latent_c_a, latent_c_v, masked_a, masked_v = self.forward_encoder(
            patches_a, patches_v, noise_a, noise_v, mask_ratio_a, mask_ratio_v
        )
        out = dict(mask_a=masked_a.mask, mask_v=masked_v.mask, latent=latent)
        pred_a = pred_v = None
        if cfg.decoder_depth and cfg.mae_loss_weight:
            pred_a, pred_v = self.forward_decoder(latent, masked_a, masked_v)
            out.update(pred_a=pred_a, pred_v=pred_v)
        if cfg.contrast_loss_weight:
            out.update(latent_c_a=latent_c_a, latent_c_v=latent_c_v)
        with jax.named_scope("loss"):
            return self._losses(out, patches_a, patches_v, masked_a.mask, masked_v.mask)

    def _losses(self, out: dict, patches_a, patches_v, mask_a, mask_v) -> dict[str, jax.Array]:
        """``out`` with the losses of its predictions and modality streams added."""
        cfg = self.cfg
        groups = cfg.loss_groups
        zero = jnp.zeros((), jnp.float32)
        loss_mae_a = loss_mae_v = loss_mae = loss_c = c_acc = zero
        if "pred_a" in out:
            # Every example has the same masked count, so the sum of G group means is G x the mean.
            loss_mae_a = groups * losses.mae_loss(
                out["pred_a"], patches_a, mask_a, cfg.norm_pix_loss
            )
            loss_mae_v = groups * losses.mae_loss(
                out["pred_v"], patches_v, mask_v, cfg.norm_pix_loss
            )
            loss_mae = cfg.mae_loss_weight * (loss_mae_a + loss_mae_v)
        if "latent_c_a" in out:
            loss_c, c_acc = contrastive_term(cfg, *pooled_streams(out))
        out.update(
            loss=loss_mae + loss_c,
            loss_mae=loss_mae,
            loss_mae_a=loss_mae_a,
            loss_mae_v=loss_mae_v,
            loss_c=loss_c,
            c_acc=c_acc,
        )
        return out
