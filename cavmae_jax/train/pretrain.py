"""CAV-MAE pretraining (the official ``run_cavmae_pretrain.py``): masked reconstruction plus
the contrastive loss on unlabelled clips."""

from __future__ import annotations

from typing import Any

import ml_collections
from flax import nnx

from cavmae_jax import flops
from cavmae_jax.models import CAVMAE, ModelConfig
from cavmae_jax.train.durations import Durations
from cavmae_jax.train.steps import LossFn
from cavmae_jax.train.trainer import Trainer

SCALARS = ("loss", "loss_mae", "loss_mae_a", "loss_mae_v", "loss_c", "c_acc")


def pretrain_loss(graphdef: nnx.GraphDef, mask_kwargs: dict[str, Any]) -> LossFn:
    """CAV-MAE pretraining: the model's own loss under fresh random masks (``key``)."""

    def loss_fn(params, state, batch, key):
        model = nnx.merge(graphdef, params, state["rest"])
        out = model(batch["audio"], batch["image"], key=key, **mask_kwargs)
        return out["loss"], {name: out[name] for name in SCALARS}

    return loss_fn


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
        return [(durations.num_steps, pretrain_loss(graphdef, masks))]

    def clip_flops(self, config: ml_collections.ConfigDict, cfg: ModelConfig) -> float:
        return (flops.pretrain_step(cfg, config.mask_ratio_a, config.mask_ratio_v),)
