"""CAV-MAE finetuning for classification (spec 4.3): the official recipe, end to end.

Per epoch: train with SpecAugment, mixup, label smoothing and noise; validate on frame 5 (full
batches) and append mAP / mAUC / d-prime / accuracy / loss to ``validation.jsonl``; add the
parameters to a running sum when the epoch is inside the weight-averaging window. The sum is part
of the checkpoint, so a resumed run averages the same epochs. After the last epoch the averaged
model is saved to ``workdir/model`` and evaluated on every clip of the evaluation split with the
10-frame ensemble (``evaluation.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cavmae_jax import convert, flops
from cavmae_jax.models import CAVMAE, CAVMAEFT, ModelConfig
from cavmae_jax.train.evaluate import EVAL_FRAME, final_evaluation, split_logits, validation_stats
from cavmae_jax.train.loop import Hooks, build_state, load_model, prepared_dataset, train
from cavmae_jax.train.metrics import MetricsWriter, plot_curves
from cavmae_jax.train.steps import make_finetune_step, make_logits_step


def initial_model(source: str, label_dim: int, seed: int) -> CAVMAEFT:
    """The finetuning init: a pretrained CAV-MAE (official ``.pth`` loaded non-strictly, as the
    official recipes, or a cavmae-jax model dir) or a finetuned model to continue from."""
    model = load_model(source, "CAVMAEFT", strict=False, label_dim=label_dim, seed=seed)
    if isinstance(model, CAVMAE):
        model = convert.export_encoder(model, label_dim, seed)
    return model


def balanced_weights(data_dir: Path, split: str, share: str, workdir: Path) -> tuple[float, ...]:
    """The official label-balanced sampling weights of this host's ``share`` of the training
    split (label counts over the whole split, as on one machine), computed once and kept in
    ``workdir/sample_weights_<process>.npy`` (reading every label of AS-2M takes a while)."""
    import numpy as np

    from input_pipeline.dataset import label_sample_weights

    cache = workdir / f"sample_weights_{jax.process_index()}.npy"
    if not cache.exists():
        np.save(cache, label_sample_weights(data_dir, split, share))
    return tuple(np.load(cache).tolist())


def training_loader(config: ml_collections.ConfigDict, data_dir: Path, workdir: Path):
    from input_pipeline.dataset import Loader, LoaderConfig, host_split

    data = config.data
    weights = None
    if data.balanced:
        hosts = LoaderConfig(1, 1, process_index=jax.process_index(),
                             process_count=jax.process_count())  # fmt: skip
        share = host_split(data.train_split, hosts)
        weights = balanced_weights(data_dir, data.train_split, share, workdir)
    loader_config = LoaderConfig(
        batch_size=config.batch_size // jax.process_count(), num_classes=config.model.label_dim,
        seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count(),
        freqm=data.freqm, timem=data.timem, mixup=data.mixup, label_smooth=data.label_smooth,
        noise=data.noise, shuffle_buffer=data.shuffle_buffer,
        sample_weights=weights,
    )  # fmt: skip
    return Loader(data_dir, data.train_split, loader_config)


def finetuning_setup(config: ml_collections.ConfigDict, workdir: Path, validation: MetricsWriter):
    """(sharded state, jitted step, loop hooks, evaluation dataset) of a finetuning run; the
    hooks validate each epoch into ``validation`` and keep the weight-averaging sum."""
    data_dir = prepared_dataset(config, workdir)
    eval_dir = Path(config.data.eval_dir) if config.data.eval_dir else data_dir
    loader = training_loader(config, data_dir, workdir)
    steps_per_epoch = loader.batches_per_epoch
    config.num_steps = config.epochs * steps_per_epoch
    cfg = ModelConfig(**config.model.to_dict())
    ts = build_state(
        config, lambda: CAVMAEFT(cfg, nnx.Rngs(config.seed)), steps_per_epoch,
        load_init=lambda source: initial_model(source, cfg.label_dim, config.seed),
        head_lr=config.head_lr, freeze_base=config.freeze_base,
    )  # fmt: skip
    shardings = (ts.param_shardings, ts.opt_shardings)
    step_fn = make_finetune_step(ts.graphdef, ts.tx, config.mode, config.loss, shardings)
    logits_step = make_logits_step(ts.graphdef, config.mode)
    wa_sum = jax.jit(lambda p: jax.tree.map(jnp.zeros_like, p), out_shardings=ts.param_shardings)

    def end_of_epoch(step: int, state: dict) -> None:
        if step % steps_per_epoch:
            return
        epoch = step // steps_per_epoch
        out = split_logits(
            lambda batch: logits_step(state["params"], ts.rest, batch), ts.mesh, eval_dir,
            config.data.eval_split, config.batch_size, cfg.label_dim, EVAL_FRAME, drop_last=True,
        )  # fmt: skip
        stats = validation_stats(out["logits"], out["label"], config.loss)
        validation.write(step, {"step": step, "epoch": epoch, **stats})
        if config.wa and config.wa_start <= epoch <= config.wa_end:
            state["wa_sum"] = jax.tree.map(jnp.add, state["wa_sum"], state["params"])
            state["wa_count"] = state["wa_count"] + 1

    hooks = Hooks(
        batches_from=loader.iterate_from,
        batch_keys=("audio", "image", "label"),
        clip_flops=flops.finetune_step(cfg, config.mode),
        extra_state={"wa_sum": wa_sum(ts.params), "wa_count": jnp.zeros((), jnp.int32)},
        after_step=end_of_epoch,
    )
    return ts, step_fn, hooks, eval_dir


def finetune(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Finetune ``CAVMAEFT`` for ``config.epochs`` epochs in ``workdir`` (resuming if possible)
    and return the final evaluation (``evaluation.json``)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    validation = MetricsWriter(workdir, active=jax.process_index() == 0, stem="validation")
    try:
        ts, step_fn, hooks, eval_dir = finetuning_setup(config, workdir, validation)
        state, _, finished = train(config, workdir, ts, step_fn, hooks)
    finally:
        validation.close()
    if not finished:
        return {}
    params = state["params"]
    if config.wa and int(state["wa_count"]):
        params = jax.tree.map(lambda s: s / state["wa_count"], state["wa_sum"])
    model = ts.model(params)
    logits_step = make_logits_step(ts.graphdef, config.mode)
    frames = tuple(range(10)) if config.eval_frames == 10 else (EVAL_FRAME,)
    result = final_evaluation(
        lambda batch: logits_step(params, ts.rest, batch), ts.mesh, eval_dir,
        config.data.eval_split, config.batch_size, config.model.label_dim, config.loss == "bce",
        frames,
    )  # fmt: skip
    if jax.process_index() == 0:
        convert.save_checkpoint(model, workdir / "model")
        (workdir / "evaluation.json").write_text(json.dumps(result, indent=1))
        plot_curves(workdir, workdir / "loss.png")
    return result
