"""PCAV-MAE pretraining: a momentum encoder and a prototype memory bank around the CAV-MAE step.

The momentum encoder follows the parameters after every update (once per update, whatever
``grad_accum``). Its embeddings of every clip form the memory bank on which the prototypes are
found: the ``memory_bank`` evaluator (``train/evaluators.py``) refreshes them before the first
update and every epoch. Prototypes, momentum parameters, parameters and optimizer state are
all in the checkpointed state, so a resumed run continues exactly. For the first
``pcav.decoder_epochs`` epochs all three losses train; after that the decoder is dropped and
only eq. (1) trains the encoders.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cavmae_jax import convert, flops
from cavmae_jax.models import ModelConfig
from cavmae_jax.models.pcav_mae import PCAVMAE, ema_update, pcav_config
from cavmae_jax.train.durations import Durations
from cavmae_jax.train.evaluators import empty_prototypes
from cavmae_jax.train.steps import pcav_loss
from cavmae_jax.train.trainer import Trainer, write_run_files


class PCAVPretraining(Trainer):
    shown = ("loss", "p_acc")

    def model_config(self, config: ml_collections.ConfigDict) -> ModelConfig:
        return pcav_config(**config.model.to_dict())

    def create(self, cfg: ModelConfig, seed: int) -> nnx.Module:
        return PCAVMAE(cfg, nnx.Rngs(seed))

    def phases(
        self, graphdef: nnx.GraphDef, config: ml_collections.ConfigDict, durations: Durations
    ):
        kwargs = dict(
            mask_ratio_a=config.mask_ratio_a,
            mask_ratio_v=config.mask_ratio_v,
            tau=config.pcav.tau,
            pje_weight=config.pcav.pje_weight,
            pcpe_weight=config.pcav.pcpe_weight,
        )
        decoder_steps = min(durations.steps(config.pcav.decoder_epochs), durations.num_steps)
        phases = [(decoder_steps, pcav_loss(graphdef, kwargs, use_decoder=True))]
        if decoder_steps < durations.num_steps:
            phases.append((durations.num_steps, pcav_loss(graphdef, kwargs, use_decoder=False)))
        return phases

    def extra_state(self, config: ml_collections.ConfigDict, cfg: ModelConfig, params) -> dict:
        return {
            "ema": jax.tree.map(jnp.copy, params),
            "protos": empty_prototypes(config.pcav, cfg.embed_dim),
        }

    def after_update(self, config: ml_collections.ConfigDict, durations: Durations):
        momentum = config.pcav.ema_momentum
        return lambda state, params, step: {"ema": ema_update(state["ema"], params, momentum)}

    def optimizer_options(self, config: ml_collections.ConfigDict) -> dict:
        return {"b1": config.b1}

    def clip_flops(self, config: ml_collections.ConfigDict, cfg: ModelConfig) -> tuple:
        """With the decoder, then without it; each plus the momentum encoder's forward."""
        ratios = (config.mask_ratio_a, config.mask_ratio_v)
        momentum = flops.features_forward(cfg)
        with_decoder = flops.pretrain_step(cfg, *ratios)
        encoders = flops.pretrain_step(cfg.replace(decoder_depth=0), *ratios)
        return with_decoder + momentum, encoders + momentum

    def finish(self, setup, state: dict, workdir) -> dict:
        convert.save_checkpoint(setup.model(state["params"]), workdir / "model")
        convert.save_checkpoint(setup.model(state["ema"]), workdir / "momentum_model")
        if jax.process_index() == 0:
            write_run_files(setup.config, workdir)
        return {}
