"""CAV-MAE pretraining (the official ``run_cavmae_pretrain.py``): masked reconstruction plus
the contrastive loss on unlabelled clips."""

from __future__ import annotations

from typing import Any

import ml_collections
from flax import nnx

from cavmae_jax import flops
from cavmae_jax.errors import UserError
from cavmae_jax.models import CAVMAE, ModelConfig
from cavmae_jax.models.cav_mae import contrastive_term, mask_noise, pooled_streams
from cavmae_jax.train.durations import Durations
from cavmae_jax.train.steps import LossFn, SplitLoss
from cavmae_jax.train.trainer import Trainer

SCALARS = ("loss", "loss_mae", "loss_mae_a", "loss_mae_v", "loss_c", "c_acc")


def pretrain_loss(graphdef: nnx.GraphDef, mask_kwargs: dict[str, Any]) -> LossFn:
    """CAV-MAE pretraining: the model's own loss under fresh random masks (``key``)."""

    def loss_fn(params, state, batch, key):
        model = nnx.merge(graphdef, params, state["rest"])
        out = model(batch["audio"], batch["image"], key=key, **mask_kwargs)
        return out["loss"], {name: out[name] for name in SCALARS}

    return loss_fn


def whole_batch_pretrain_loss(
    graphdef: nnx.GraphDef, cfg: ModelConfig, mask_kwargs: dict[str, Any]
) -> SplitLoss:
    """The same loss, with the contrastive term over the whole batch when the step splits it
    into micro-batches (``train/steps.py``, ``cached_gradients``)."""
    ratio_a, mode = mask_kwargs["mask_ratio_a"], mask_kwargs["mask_mode"]

    def local(params, state, batch):
        model = nnx.merge(graphdef, params, state["rest"])
        out = model(batch["audio"], batch["image"], **mask_kwargs, **noise_of(batch))
        metrics = {name: out[name] for name in SCALARS if name not in ("loss", "loss_c", "c_acc")}
        return out["loss_mae"], metrics, pooled_streams(out)

    def whole(pooled):
        loss_c, c_acc = contrastive_term(cfg, *pooled)
        return loss_c, {"loss_c": loss_c, "c_acc": c_acc}

    return SplitLoss(lambda key, clips: mask_noise(cfg, key, clips, ratio_a, mode), local, whole)


def noise_of(batch: dict) -> dict:
    return {"noise_a": batch["noise_a"], "noise_v": batch["noise_v"]}


class CAVMAEPretraining(Trainer):
    shown = ("loss", "c_acc")

    def create(self, cfg: ModelConfig, seed: int) -> nnx.Module:
        return CAVMAE(cfg, nnx.Rngs(seed))

    def loss_phases(
        self, graphdef: nnx.GraphDef, config: ml_collections.ConfigDict, durations: Durations
    ):
        masks = dict(
            mask_ratio_a=config.mask_ratio_a,
            mask_ratio_v=config.mask_ratio_v,
            mask_mode=config.mask_mode,
        )
        cfg = self.model_config(config)
        if cfg.contrast_loss_weight and contrast_over(config) == "batch":
            return [(durations.num_steps, whole_batch_pretrain_loss(graphdef, cfg, masks))]
        return [(durations.num_steps, pretrain_loss(graphdef, masks))]

    def clip_flops(self, config: ml_collections.ConfigDict, cfg: ModelConfig) -> float:
        """With the contrastive term over the whole batch of micro-batches, the embeddings'
        forward pass runs twice."""
        ratios = (config.mask_ratio_a, config.mask_ratio_v)
        step = flops.pretrain_step(cfg, *ratios)
        cached = config.grad_accum > 1 and contrast_over(config) == "batch"
        if cfg.contrast_loss_weight and cached:
            step += flops.pretrain_forward(cfg.replace(decoder_depth=0), *ratios)
        return (step,)


def contrast_over(config: ml_collections.ConfigDict) -> str:
    """Which clips a contrastive loss compares under ``grad_accum``: ``batch`` (the whole
    global batch, as without accumulation) or ``micro_batch`` (each micro-batch's own, as the
    official per-GPU loss)."""
    if config.contrast_over not in ("batch", "micro_batch"):
        raise UserError(
            f"contrast_over {config.contrast_over!r}: expected 'batch' or 'micro_batch'"
        )
    return config.contrast_over
