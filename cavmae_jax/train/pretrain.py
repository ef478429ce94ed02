"""CAV-MAE pretraining (spec 4.2): masked reconstruction + contrastive loss on unlabeled clips."""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
from flax import nnx

from cavmae_jax import convert, flops
from cavmae_jax.models import CAVMAE, ModelConfig
from cavmae_jax.train.loop import Hooks, build_state, load_model, prepared_dataset, train
from cavmae_jax.train.metrics import plot_curves
from cavmae_jax.train.steps import make_pretrain_step


def training_batches(config: ml_collections.ConfigDict, data_dir: Path):
    """``start batch -> iterator`` over the pretraining stream (random frame, noise + roll)."""
    from input_pipeline.dataset import Loader, LoaderConfig

    loader_config = LoaderConfig(
        batch_size=config.batch_size // jax.process_count(), num_classes=config.data.classes,
        seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count(),
        noise=config.data.noise, shuffle_buffer=config.data.shuffle_buffer,
    )  # fmt: skip
    return Loader(data_dir, "train", loader_config).iterate_from


def pretraining_setup(config: ml_collections.ConfigDict, workdir: Path):
    """(sharded state, jitted step, loop hooks) of a pretraining run."""
    data_dir = prepared_dataset(config, workdir)
    cfg = ModelConfig(**config.model.to_dict())
    ts = build_state(
        config, lambda: CAVMAE(cfg, nnx.Rngs(config.seed)), config.steps_per_epoch,
        load_init=lambda source: load_model(source, "CAVMAE"),
    )  # fmt: skip
    mask_kwargs = dict(
        mask_ratio_a=config.mask_ratio_a,
        mask_ratio_v=config.mask_ratio_v,
        mask_mode=config.mask_mode,
    )
    step_fn = make_pretrain_step(
        ts.graphdef, ts.tx, mask_kwargs, (ts.param_shardings, ts.opt_shardings)
    )
    hooks = Hooks(
        batches_from=training_batches(config, data_dir),
        batch_keys=("audio", "image"),
        clip_flops=flops.pretrain_step(cfg, config.mask_ratio_a, config.mask_ratio_v),
        shown=("loss", "c_acc"),
    )
    return ts, step_fn, hooks


def pretrain(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, float]:
    """Pretrain ``CAVMAE`` for ``config.num_steps`` steps in ``workdir`` (resuming if possible).
    Metrics go to ``workdir/metrics.jsonl`` (and ``loss.png``), checkpoints to
    ``workdir/checkpoints`` and the final model to ``workdir/model`` (Orbax). Returns the last
    logged metrics."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ts, step_fn, hooks = pretraining_setup(config, workdir)
    state, logged, finished = train(config, workdir, ts, step_fn, hooks)
    if finished and jax.process_index() == 0:
        convert.save_checkpoint(ts.model(state["params"]), workdir / "model")
        plot_curves(workdir, workdir / "loss.png")
    return logged
