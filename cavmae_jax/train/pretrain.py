"""CAV-MAE pretraining (the official ``run_cavmae_pretrain.py``): masked reconstruction plus
the contrastive loss on unlabelled clips."""

from __future__ import annotations

import ml_collections
from flax import nnx

from cavmae_jax import flops
from cavmae_jax.models import CAVMAE, ModelConfig
from cavmae_jax.train.durations import Durations
from cavmae_jax.train.steps import pretrain_loss
from cavmae_jax.train.trainer import Trainer


class CAVMAEPretraining(Trainer):
    shown = ("loss", "c_acc")

    def create(self, cfg: ModelConfig, seed: int) -> nnx.Module:
        return CAVMAE(cfg, nnx.Rngs(seed))

    def phases(
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
