"""CAV-MAE finetuning for classification (the official ``run_cavmae_ft.py``).

Per update: SpecAugment, mixup, label smoothing and noise (the loader), BCE or soft-target CE.
At the end of every epoch inside the weight-averaging window the step adds the parameters to a
running sum kept in the state, so a resumed run averages the same epochs. Per-epoch validation is
the ``validation`` evaluator (``config.evals``). After the last update the averaged model is saved
to ``workdir/model`` and evaluated on every clip of the evaluation split with the 10-frame
ensemble (``evaluation.json``).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from cavmae_jax import convert, flops, paths
from cavmae_jax.errors import UserError
from cavmae_jax.evaluators import Classification, fbank_norm
from cavmae_jax.inference import EVAL_FRAME
from cavmae_jax.losses import CLASSIFICATION_LOSSES
from cavmae_jax.models import CAVMAE, CAVMAEFT, ModelConfig
from cavmae_jax.paths import Path
from cavmae_jax.train.durations import Durations
from cavmae_jax.train.optim import head_labels
from cavmae_jax.train.steps import LossFn
from cavmae_jax.train.trainer import Trainer, load_weights, write_run_files


def finetune_loss(
    graphdef: nnx.GraphDef, mode: str, loss: str, freeze_base: bool = False
) -> LossFn:
    """Classification: ``loss`` ("bce" or "ce") of the logits in finetuning ``mode`` against
    the batch's soft labels (no masks: ``key`` is unused). A frozen base is a constant of the
    loss, so no gradient is computed through it: the backward pass is the head's alone."""
    loss_of = CLASSIFICATION_LOSSES[loss]

    def loss_fn(params, state, batch, key):
        if freeze_base:
            params = jax.tree.map(
                lambda part, p: p if part == "head" else jax.lax.stop_gradient(p),
                head_labels(params),
                params,
            )
        model = nnx.merge(graphdef, params, state["rest"])
        value = loss_of(model(batch["audio"], batch["image"], mode=mode), batch["label"])
        return value, {"loss": value}

    return loss_fn


def balanced_weights(data_dir: Path, split: str, share: str, workdir: Path) -> tuple[float, ...]:
    """The official label-balanced sampling weights of this host's ``share`` of the training
    split (label counts over the whole split, as on one machine), computed once and kept in
    ``workdir/sample_weights_<process>.npy`` (reading every label of AS-2M takes a while)."""
    from input_pipeline.dataset import label_sample_weights

    cache = workdir / f"sample_weights_{jax.process_index()}.npy"
    if not cache.exists():
        paths.save_array(cache, label_sample_weights(data_dir, split, share))
    with cache.open("rb") as f:
        return tuple(np.load(f).tolist())


class Finetuning(Trainer):
    batch_keys = ("audio", "image", "label")

    def create(self, cfg: ModelConfig, seed: int) -> nnx.Module:
        return CAVMAEFT(cfg, nnx.Rngs(seed))

    def load_init(self, source: str, cfg: ModelConfig, seed: int) -> nnx.Module:
        """A pretrained CAV-MAE (official ``.pth`` loaded non-strictly, as the official recipes,
        or a cavmae-jax model dir) or a finetuned model to continue from."""
        model = load_weights(source, "CAVMAEFT", strict=False, label_dim=cfg.label_dim, seed=seed)
        if isinstance(model, CAVMAE):
            model = convert.export_encoder(model, cfg.label_dim, seed)
        return model

    def loader(self, config: ml_collections.ConfigDict, data_dir: Path, workdir: Path):
        from input_pipeline.dataset import Loader, LoaderConfig, host_split

        data = config.data
        hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
        loader_config = LoaderConfig(
            batch_size=config.batch_size // jax.process_count(),
            num_classes=config.model.label_dim,
            seed=config.seed,
            freqm=data.freqm,
            timem=data.timem,
            mixup=data.mixup,
            label_smooth=data.label_smooth,
            noise=data.noise,
            mean=data.fbank_mean,
            std=data.fbank_std,
            **hosts,
        )
        if data.balanced:
            share = host_split(data.train_split, loader_config)
            weights = balanced_weights(data_dir, data.train_split, share, workdir)
            loader_config = dataclasses.replace(loader_config, sample_weights=weights)
        loader = Loader(data_dir, data.train_split, loader_config)
        if data.mixup and not loader.has_waveform:
            if not data.mixup_approx:
                raise UserError(
                    f"{data_dir}: mixup {data.mixup} mixes waveforms as the official loader "
                    "does, and this dataset stores none: prepare it with --keep-waveform, or "
                    "set --config.data.mixup_approx=True (mixes mel energies instead) or "
                    "--config.data.mixup=0"
                )
            if jax.process_index() == 0:
                print("mixup: mel energies mixed (no waveforms stored), not the official waveforms")
        return loader

    def loss_phases(
        self, graphdef: nnx.GraphDef, config: ml_collections.ConfigDict, durations: Durations
    ):
        loss = finetune_loss(graphdef, config.mode, config.loss, config.freeze_base)
        return [(durations.num_steps, loss)]

    def extra_state(self, config: ml_collections.ConfigDict, cfg: ModelConfig, params) -> dict:
        return {
            "wa_sum": jax.tree.map(jnp.zeros_like, params),
            "wa_count": jnp.zeros((), jnp.int32),
        }

    def after_update(self, config: ml_collections.ConfigDict, durations: Durations):
        """At the end of an epoch in ``wa_start..wa_end``: add the parameters to the sum."""
        per_epoch = durations.steps_per_epoch

        def add_to_average(state, params, step):
            epoch = step // per_epoch
            take = (step % per_epoch == 0) & (config.wa_start <= epoch) & (epoch <= config.wa_end)
            take = take & config.wa
            total = jax.tree.map(lambda s, p: jnp.where(take, s + p, s), state["wa_sum"], params)
            return {"wa_sum": total, "wa_count": state["wa_count"] + take.astype(jnp.int32)}

        return add_to_average

    def optimizer_options(self, config: ml_collections.ConfigDict) -> dict:
        return {"head_lr": config.head_lr, "freeze_base": config.freeze_base}

    def clip_flops(self, config: ml_collections.ConfigDict, cfg: ModelConfig) -> float:
        return (flops.finetune_step(cfg, config.mode, config.freeze_base),)

    def final_evaluator(self, config: ml_collections.ConfigDict, graphdef, mesh, data_dir):
        """Every clip of the evaluation split, with the 10-frame ensemble of the recipe."""
        frames = tuple(range(10)) if config.eval_frames == 10 else (EVAL_FRAME,)
        return Classification(
            graphdef,
            mesh,
            config.data.eval_dir or data_dir,
            config.data.eval_split,
            config.batch_size,
            config.model.label_dim,
            config.mode,
            config.loss,
            frames,
            norm=fbank_norm(config),
        )

    def finish(self, setup, state: dict, workdir: Path) -> dict:
        """The averaged model (``W/model``) and its final evaluation (``evaluation.json``)."""
        config = setup.config
        params = state["params"]
        if config.wa:
            if not int(state["wa_count"]):
                epochs = setup.durations.num_steps // setup.durations.steps_per_epoch
                raise UserError(
                    f"weight averaging over epochs {config.wa_start}..{config.wa_end} averaged "
                    f"no epoch: the run ended after epoch {epochs}. Nothing was saved as the "
                    "model; the same command with --config.wa=False saves the last parameters "
                    "from the final checkpoint, or a longer run reaches the window"
                )
            params = jax.tree.map(lambda s: s / state["wa_count"], state["wa_sum"])
        final = self.final_evaluator(config, setup.graphdef, setup.mesh, setup.data_dir)
        result = {**final.run({"params": params, "rest": state["rest"]}), "loss": config.loss}
        convert.save_model(
            setup.model(params, state["rest"]),
            workdir / "model",
            {"mode": config.mode, "loss": config.loss},
            fbank_norm(config),
        )
        if jax.process_index() == 0:
            (workdir / "evaluation.json").write_text(json.dumps(result, indent=1))
            write_run_files(config, workdir)
        return result
