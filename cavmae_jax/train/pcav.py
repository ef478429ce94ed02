"""PCAV-MAE pretraining: a momentum encoder and a prototype memory bank around the CAV-MAE step.

The momentum encoder follows the parameters after every update (once per update, whatever
``grad_accum``). Its embeddings of every clip form the memory bank on which the prototypes are
found: the ``memory_bank`` refresh (``config.pcav.refresh``) finds them before the first update
and every epoch. Prototypes, momentum parameters, parameters and optimizer state are
all in the checkpointed state, so a resumed run continues exactly.

Phases, in update order: ``pcav.warmup_epochs`` of reconstruction alone (plus CAV-MAE's InfoNCE
with ``pcav.infonce``), then ``pcav.decoder_epochs`` with all three losses and the rest with eq.
(1) alone (the decoder dropped), or these two the other way round (``pcav.decoder_first``).
The momentum follows the run's length when ``pcav.ema_half_life_epochs`` is set; the resolved
value is printed at start-up with its half-life.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from cavmae_jax import convert, flops, prototypes
from cavmae_jax.errors import UserError
from cavmae_jax.evaluators import abstract_inputs, fbank_norm, period_of
from cavmae_jax.inference import embedding_program, split_bank
from cavmae_jax.models import ModelConfig
from cavmae_jax.models.pcav_mae import PCAVMAE, clip_prototypes, ema_update, pcav_config
from cavmae_jax.train.durations import Durations
from cavmae_jax.train.pretrain import contrast_over
from cavmae_jax.train.steps import LossFn
from cavmae_jax.train.trainer import Trainer, write_run_files

SCALARS = (
    "loss",
    "loss_pje",
    "loss_pcpe",
    "loss_r",
    "loss_c",
    "loss_mae_a",
    "loss_mae_v",
    "p_acc",
)
PHASES = ("warmup", "decoder", "encoders")
INFONCE = ("off", "warmup", "always")


def pcav_loss(graphdef: nnx.GraphDef, model_kwargs: dict[str, Any], use_decoder: bool) -> LossFn:
    """PCAV-MAE: the momentum encoder (``state["ema"]``) embeds the unmasked batch to find each
    clip's prototypes (``state["protos"]``); the trained encoder is scored against them (none
    of this in a phase without prototypes)."""

    def loss_fn(params, state, batch, key):
        protos = state["protos"]
        targets = jnp.zeros((protos["valid"].shape[0], batch["audio"].shape[0]), jnp.int32)
        if model_kwargs.get("use_prototypes", True):
            momentum = nnx.merge(graphdef, state["ema"], state["rest"])
            with jax.named_scope("momentum"):
                audio_m, visual_m = momentum.clip_embeddings(batch["audio"], batch["image"])
            audio_m, visual_m = jax.lax.stop_gradient((audio_m, visual_m))
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


def phase_settings(pcav: ml_collections.ConfigDict, phase: str) -> dict[str, Any]:
    """The model's switches in ``phase`` (``warmup``, ``decoder`` or ``encoders``)."""
    if pcav.infonce not in INFONCE:
        raise UserError(f"pcav.infonce {pcav.infonce!r}: expected one of {list(INFONCE)}")
    infonce = pcav.infonce == "always" or (pcav.infonce == "warmup" and phase == "warmup")
    return {
        "use_decoder": phase != "encoders",
        "use_prototypes": phase != "warmup",
        "symmetric_pje": pcav.symmetric_pje,
        "infonce_weight": pcav.infonce_weight if infonce else 0.0,
        "pje_weight": pcav.pje_weight,
        "pcpe_weight": pcav.pcpe_weight,
        # the 1 / tau of eqs. (1) and (3); under PCL's scaling tau is in the gammas instead
        "tau": pcav.tau if pcav.scale == "paper" else 1.0,
    }


def phase_ends(pcav: ml_collections.ConfigDict, durations: Durations) -> list[tuple[str, int]]:
    """(phase, its last update) in run order; a phase of no update ends where the one before
    it ends."""
    total = durations.num_steps
    warmup = min(durations.steps(pcav.warmup_epochs), total)
    decoder = min(warmup + durations.steps(pcav.decoder_epochs), total)
    if pcav.decoder_first:
        return [("warmup", warmup), ("decoder", decoder), ("encoders", total)]
    encoders = max(warmup, total - (decoder - warmup))
    return [("warmup", warmup), ("encoders", encoders), ("decoder", total)]


# Parameter names (dotted, ``fnmatch`` patterns) by the path of the model that reads them.
# Every block carries the joint norms and both modality pairs (official layout); only the joint
# layers read the modality pairs, so the modality-specific and decoder blocks never train them.
UNREAD = ("blocks_[av].*.norm[12]_[av].*", "decoder_blocks.*.norm[12]_[av].*")
STREAM_A = ("blocks_u.*.norm[12]_a.*", "norm_a.*")  # the audio stream of the joint layers
STREAM_V = ("blocks_u.*.norm[12]_v.*", "norm_v.*")
JOINT = ("blocks_u.*.norm[12].*", "norm.*")  # the joint tokens' own norms
VISUAL = ("patch_embed_v.*", "modality_v", "blocks_v.*")  # the visual branch below the streams
DECODER = ("mask_token", "decoder_*")
PROJECTIONS = ("proto_proj_*",)


def untrained(pcav: ml_collections.ConfigDict, phase: str) -> tuple[str, ...]:
    """The parameters the loss of ``phase`` gives no gradient, by construction (the test checks
    that exactly these get none). Eq. (1) pulls the audio stream towards constant visual
    prototypes, so without ``symmetric_pje`` or InfoNCE the visual stream learns from nothing,
    and in the encoder-only phase nor does the whole visual branch."""
    settings = phase_settings(pcav, phase)
    pje = settings["use_prototypes"] and settings["pje_weight"] > 0
    pcpe = settings["use_prototypes"] and settings["use_decoder"] and settings["pcpe_weight"] > 0
    infonce = settings["infonce_weight"] > 0
    out = list(UNREAD)
    if not settings["use_decoder"]:
        out += [*DECODER, *JOINT]
    if not pcpe:
        out += PROJECTIONS
    if not (pje or infonce):
        out += STREAM_A
    if not (infonce or (pje and pcav.symmetric_pje)):
        out += STREAM_V
        if not settings["use_decoder"]:
            out += VISUAL
    return tuple(out)


def resolved_momentum(pcav: ml_collections.ConfigDict, durations: Durations) -> float:
    """The momentum encoder's momentum: from ``ema_half_life_epochs`` when set, else
    ``ema_momentum``."""
    if pcav.ema_half_life_epochs > 0:
        return 0.5 ** (1.0 / max(pcav.ema_half_life_epochs * durations.steps_per_epoch, 1e-9))
    return pcav.ema_momentum


def momentum_summary(momentum: float, durations: Durations) -> str:
    """The momentum with its half-life in updates and epochs, set against the run's length."""
    half_life = math.log(0.5) / math.log(momentum) if 0 < momentum < 1 else math.inf
    epochs = half_life / durations.steps_per_epoch
    line = (
        f"momentum encoder: momentum {momentum:.6g}, half-life {half_life:.4g} updates "
        f"({epochs:.3g} epochs) in a run of {durations.num_steps} updates"
    )
    if half_life > durations.num_steps / 10:
        line += (
            f"; at the end the momentum parameters are still {momentum**durations.num_steps:.0%} "
            "their initial values (a shorter pcav.ema_half_life_epochs fits this run)"
        )
    return line


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
        bank = split_bank(
            graphdef, mesh, data_dir, "train", batch_size, state["ema"], state["rest"], norm
        )
        arrays, levels = prototypes.from_settings(bank, pcav, seed)
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
        masks = dict(mask_ratio_a=config.mask_ratio_a, mask_ratio_v=config.mask_ratio_v)
        whole_batch_asked = config.grad_accum > 1 and contrast_over(config) == "batch"
        if config.pcav.infonce != "off" and whole_batch_asked:
            raise UserError(
                "pcav.infonce with grad_accum > 1: PCAV-MAE takes InfoNCE per micro-batch "
                "only; set --config.contrast_over=micro_batch (negatives from each "
                "micro-batch), or --config.grad_accum=1"
            )
        phases = []
        for phase, last in phase_ends(config.pcav, durations):
            settings = {**masks, **phase_settings(config.pcav, phase)}
            use_decoder = settings.pop("use_decoder")
            phases.append((last, pcav_loss(graphdef, settings, use_decoder)))
        return phases

    def refresh_programs(self, config: ml_collections.ConfigDict, setup, state: dict, clips: int):
        """The memory bank's embedding of a batch and, for density peaks, the two all-pairs
        passes over the whole bank (split by rows over the mesh)."""
        size = config.pcav.refresh.get("batch_size", config.batch_size)
        batch = abstract_inputs(setup.cfg, setup.mesh, size)
        programs = {"memory bank: embedding": embedding_program(setup.graphdef, state, batch)}
        if config.pcav.method == "density":
            neighbours = max(config.pcav.granularities)
            passes = prototypes.bank_programs(clips, setup.cfg.embed_dim, neighbours, setup.mesh)
            programs.update({f"memory bank: {name}": lowered for name, lowered in passes.items()})
        return programs

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
        momentum = resolved_momentum(config.pcav, durations)
        if jax.process_index() == 0:
            print(momentum_summary(momentum, durations))
        return lambda state, params, step: {"ema": ema_update(state["ema"], params, momentum)}

    def clip_flops(self, config: ml_collections.ConfigDict, cfg: ModelConfig) -> tuple:
        """Per phase, in ``loss_phases``' order: the warm-up's masked autoencoder step, the
        decoder phase's and the encoder-only one's, each of the last two plus the momentum
        encoder's forward."""
        ratios = (config.mask_ratio_a, config.mask_ratio_v)
        momentum = flops.features_forward(cfg)
        with_decoder = flops.pretrain_step(cfg, *ratios)
        by_phase = {
            "warmup": with_decoder,
            "decoder": with_decoder + momentum,
            "encoders": flops.pretrain_step(cfg.replace(decoder_depth=0), *ratios) + momentum,
        }
        order = ("decoder", "encoders") if config.pcav.decoder_first else ("encoders", "decoder")
        return tuple(by_phase[phase] for phase in ("warmup", *order))

    def finish(self, setup, state: dict, workdir) -> dict:
        norm = fbank_norm(setup.config)
        model, momentum = (setup.model(state[k], state["rest"]) for k in ("params", "ema"))
        convert.save_model(model, workdir / "model", fbank_norm=norm)
        convert.save_model(momentum, workdir / "momentum_model", fbank_norm=norm)
        if jax.process_index() == 0:
            write_run_files(setup.config, workdir)
        return {}
