"""PCAV-MAE pretraining: a momentum encoder and a prototype memory bank around the CAV-MAE step.

The momentum encoder follows the parameters after every update (once per update, whatever
``grad_accum``). Its embeddings of every clip form the memory bank on which the prototypes are
found: the ``memory_bank`` refresh (``config.pcav.refresh``) finds them before the first update
and every epoch. Prototypes, momentum parameters, parameters and optimizer state are
all in the checkpointed state, so a resumed run continues exactly. For the first
``pcav.decoder_epochs`` epochs all three losses train; after that the decoder is dropped and
only eq. (1) trains the encoders.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from cavmae_jax import convert, flops, prototypes
from cavmae_jax.evaluators import fbank_norm, period_of
from cavmae_jax.inference import split_embeddings
from cavmae_jax.models import ModelConfig
from cavmae_jax.models.pcav_mae import PCAVMAE, clip_prototypes, ema_update, pcav_config
from cavmae_jax.train.durations import Durations
from cavmae_jax.train.steps import LossFn
from cavmae_jax.train.trainer import Trainer, write_run_files

SCALARS = ("loss", "loss_pje", "loss_pcpe", "loss_r", "loss_mae_a", "loss_mae_v", "p_acc")


def pcav_loss(graphdef: nnx.GraphDef, model_kwargs: dict[str, Any], use_decoder: bool) -> LossFn:
    """PCAV-MAE: the momentum encoder (``state["ema"]``) embeds the unmasked batch to find each
    clip's prototypes (``state["protos"]``); the trained encoder is scored against them."""

    def loss_fn(params, state, batch, key):
        momentum = nnx.merge(graphdef, state["ema"], state["rest"])
        with jax.named_scope("momentum"):
            audio_m, visual_m = momentum.clip_embeddings(batch["audio"], batch["image"])
        audio_m, visual_m = jax.lax.stop_gradient((audio_m, visual_m))
        protos = state["protos"]
        targets = clip_prototypes(
            audio_m, visual_m, protos["audio"], protos["visual"], protos["valid"]
        )
        out = nnx.merge(graphdef, params, state["rest"])(
            batch["audio"],
            batch["image"],
            protos,
            targets,
            key=key,
            use_decoder=use_decoder,
            **model_kwargs,
        )
        return out["loss"], {name: out[name] for name in SCALARS}

    return loss_fn


def empty_prototypes(pcav: ml_collections.ConfigDict, dim: int) -> dict:
    """Prototype arrays before the first refresh (none valid)."""
    k, levels = pcav.max_prototypes, len(pcav.granularities)
    return {
        "audio": jnp.zeros((levels, k, dim)),
        "visual": jnp.zeros((levels, k, dim)),
        "gamma": jnp.ones((levels, k)),
        "valid": jnp.zeros((levels, k), bool),
    }


def memory_bank_refresh(graphdef, mesh, data_dir, batch_size: int, pcav, seed: int, norm=None):
    """``state -> (state, scalars)``: the momentum encoder (``state["ema"]``) embeds every
    training clip, and the prototypes of every granularity found on that bank replace
    ``state["protos"]``; the scalars are the prototype counts."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def refresh(state: dict) -> tuple[dict, dict]:
        bank = split_embeddings(
            graphdef, mesh, data_dir, "train", batch_size, state["ema"], state["rest"], norm
        )
        arrays, levels = prototypes.from_settings(bank, pcav, seed, mesh)
        counts = {f"prototypes_{g}": len(level["sizes"]) for g, level in enumerate(levels)}
        return {**state, "protos": jax.device_put(arrays, replicated)}, counts

    return refresh


class PCAVPretraining(Trainer):
    shown = ("loss", "p_acc")
    # a MAE / CAV-MAE init has no prototype projections and another decoder size
    own_layers = (
        "proto_proj_a",
        "proto_proj_v",
        "mask_token",
        "decoder_modality_a",
        "decoder_modality_v",
        "decoder_pos_embed_a",
        "decoder_pos_embed_v",
        "decoder_embed",
        "decoder_blocks",
        "decoder_norm",
        "decoder_pred_a",
        "decoder_pred_v",
    )

    def model_config(self, config: ml_collections.ConfigDict) -> ModelConfig:
        return pcav_config(**config.model.to_dict())

    def create(self, cfg: ModelConfig, seed: int) -> nnx.Module:
        return PCAVMAE(cfg, nnx.Rngs(seed))

    def loss_phases(
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

    def refreshes(self, config, graphdef, mesh, data_dir, steps_per_epoch: int):
        spec = config.pcav.refresh
        batch = spec.get("batch_size", config.batch_size)
        refresh = memory_bank_refresh(
            graphdef, mesh, data_dir, batch, config.pcav, config.seed, fbank_norm(config)
        )
        return [("memory_bank", period_of(spec, steps_per_epoch), refresh)]

    def after_update(self, config: ml_collections.ConfigDict, durations: Durations):
        momentum = config.pcav.ema_momentum
        return lambda state, params, step: {"ema": ema_update(state["ema"], params, momentum)}

    def clip_flops(self, config: ml_collections.ConfigDict, cfg: ModelConfig) -> tuple:
        """With the decoder, then without it; each plus the momentum encoder's forward."""
        ratios = (config.mask_ratio_a, config.mask_ratio_v)
        momentum = flops.features_forward(cfg)
        with_decoder = flops.pretrain_step(cfg, *ratios)
        encoders = flops.pretrain_step(cfg.replace(decoder_depth=0), *ratios)
        return with_decoder + momentum, encoders + momentum

    def finish(self, setup, state: dict, workdir) -> dict:
        convert.save_model(setup.model(state["params"], state["rest"]), workdir / "model")
        convert.save_model(setup.model(state["ema"], state["rest"]), workdir / "momentum_model")
        if jax.process_index() == 0:
            write_run_files(setup.config, workdir)
        return {}
