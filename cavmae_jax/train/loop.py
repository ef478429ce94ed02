"""The pretraining loop: sharded model and optimizer, jitted steps, metrics, checkpoints, resume.

A run in ``workdir`` resumes by itself from the newest checkpoint (parameters, optimizer state,
step); the data stream restarts at the same batch (the loader is keyed by batch index) and the
masking key of step ``s`` is ``fold_in(seed, s)``, so a resumed run ends with the same parameters
as an uninterrupted one. SIGTERM saves a checkpoint at the next step boundary and exits.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import ml_collections
from flax import nnx
from tqdm import tqdm

from cavmae_jax import convert, flops
from cavmae_jax.models import CAVMAE, ModelConfig
from cavmae_jax.train import sharding
from cavmae_jax.train.checkpoint import Checkpointer, PreemptionFlag
from cavmae_jax.train.metrics import MetricsWriter, plot_losses
from cavmae_jax.train.optim import make_optimizer, multistep_schedule, warmup_cosine
from cavmae_jax.train.steps import make_pretrain_step


def training_batches(config: ml_collections.ConfigDict, workdir: Path, start_batch: int):
    """Batches from the prepared dataset ``config.data.dir``, from batch ``start_batch`` on; with
    ``config.data.generate`` the demo videos are first generated and prepared (resumably)."""
    from input_pipeline import prepare, synthetic
    from input_pipeline.dataset import Loader, LoaderConfig

    data = config.data
    data_dir = Path(data.dir) if data.dir else workdir / "data" / "dataset"
    if data.generate and not (data_dir / "dataset_info.json").exists():
        videos = workdir / "data" / "videos"
        listing = videos / "clips.csv"
        if not listing.exists():
            synthetic.generate(videos, clips=data.clips, classes=data.classes, seed=config.seed)
        prepare.prepare(listing, data_dir, labels=videos / "labels.csv", workers=data.workers)
    loader_config = LoaderConfig(
        batch_size=config.batch_size // jax.process_count(), num_classes=data.classes,
        seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count(),
        noise=data.noise, shuffle_buffer=data.shuffle_buffer,
    )  # fmt: skip
    return Loader(data_dir, "train", loader_config).iterate_from(start_batch)


def learning_rate(config: ml_collections.ConfigDict):
    """The official per-epoch MultiStep schedule, or warmup + cosine (``config.schedule``)."""
    if config.schedule == "cosine":
        return warmup_cosine(config.lr, config.warmup_steps, config.num_steps)
    return multistep_schedule(
        config.lr, config.steps_per_epoch, config.lr_decay_start, config.lr_decay_every,
        config.lr_decay,
    )  # fmt: skip


def load_initial_weights(model: CAVMAE, source: str, mesh, rules) -> None:
    """Overwrite ``model`` with an official ``.pth`` or a cavmae-jax model directory (the
    recipes start from IN-initial or a pretrained CAV-MAE), keeping its sharded layout."""
    if source.endswith(".pth"):
        loaded = convert.load_torch_checkpoint(source, kind="CAVMAE")
    else:
        loaded = convert.load_checkpoint(source)
    state = nnx.state(loaded)
    target = sharding.state_shardings(nnx.state(model), mesh, rules)
    nnx.update(model, jax.device_put(state, target))


def _keep_metrics_until(path: Path, step: int) -> None:
    """On resume, drop metric lines logged after the checkpoint (they will be logged again)."""
    if path.exists():
        lines = [x for x in path.read_text().splitlines() if json.loads(x)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def pretrain(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, float]:
    """Pretrain ``CAVMAE`` for ``config.num_steps`` steps in ``workdir`` (resuming if possible).
    Metrics go to ``workdir/metrics.jsonl`` (and ``loss.png``), checkpoints to
    ``workdir/checkpoints`` and the final model to ``workdir/model`` (Orbax). Returns the last
    logged metrics."""
    if not config.data.dir and not config.data.generate:
        raise ValueError("no training data: set --config.data.dir to a `cavmae prepare` output")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig(**config.model.to_dict())
    mesh = sharding.make_mesh(config.mesh.to_dict())
    rules = sharding.RULES[config.sharding]
    model = sharding.create_sharded(lambda: CAVMAE(cfg, nnx.Rngs(config.seed)), mesh, rules)
    if config.init:
        load_initial_weights(model, config.init, mesh, rules)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    param_shardings = sharding.state_shardings(params, mesh, rules)
    schedule = learning_rate(config)
    tx = make_optimizer(
        schedule, params, config.optimizer, config.weight_decay, clip_norm=config.clip_norm,
        accumulate=config.grad_accum,
    )  # fmt: skip
    opt_shardings = sharding.optimizer_shardings(tx, params, param_shardings)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    mask_kwargs = dict(
        mask_ratio_a=config.mask_ratio_a,
        mask_ratio_v=config.mask_ratio_v,
        mask_mode=config.mask_mode,
    )
    step_fn = make_pretrain_step(graphdef, tx, mask_kwargs, (param_shardings, opt_shardings))
    checkpointer = Checkpointer(workdir / "checkpoints", config.keep_checkpoints)
    start = checkpointer.latest_step() or 0
    if start:
        state, _ = checkpointer.restore(start, {"params": params, "opt_state": opt_state})
        params, opt_state = state["params"], state["opt_state"]
    metrics_path = workdir / "metrics.jsonl"
    _keep_metrics_until(metrics_path, start)
    batches = training_batches(config, workdir, start)
    key = jax.random.key(config.seed)
    preemption = PreemptionFlag()
    logged: dict[str, float] = {}
    clip_flops = flops.pretrain_step(cfg, config.mask_ratio_a, config.mask_ratio_v)
    clock, clock_step = time.perf_counter(), start

    def save(step: int, force: bool = False) -> None:
        meta = {"step": step, "data_batch": step, "config": config.to_dict()}
        checkpointer.save(step, {"params": params, "opt_state": opt_state}, meta, force=force)

    writer = MetricsWriter(workdir, active=jax.process_index() == 0)
    try:
        with tqdm(initial=start, total=config.num_steps) as bar:
            for step in range(start + 1, config.num_steps + 1):
                local = next(batches)
                batch = sharding.global_batch(
                    {"audio": local["audio"], "image": local["image"]}, mesh
                )
                params, opt_state, metrics = step_fn(
                    params, rest, opt_state, batch, jax.random.fold_in(key, step)
                )
                bar.update()
                periodic = step % config.checkpoint_every == 0 or step == config.num_steps
                if periodic or preemption.requested:
                    save(step, force=preemption.requested)
                if preemption.requested:
                    print(f"SIGTERM: saved step {step}, exiting")
                    break
                if step % config.log_every and step != config.num_steps:
                    continue
                logged = {name: float(value) for name, value in metrics.items()}
                if not all(math.isfinite(v) for v in logged.values()):
                    raise FloatingPointError(f"non-finite metrics at step {step}: {logged}")
                now = time.perf_counter()
                clips_per_s = (step - clock_step) * config.batch_size / (now - clock)
                tflops = clips_per_s * clip_flops / 1e12
                mfu = tflops / (config.peak_tflops * mesh.size)
                logged.update(step=step, lr=float(schedule(step - 1)), clips_per_s=clips_per_s,
                              tflops=tflops, mfu=mfu)  # fmt: skip
                clock, clock_step = now, step
                writer.write(step, logged)
                bar.set_postfix(loss=f"{logged['loss']:.4f}", c_acc=f"{logged['c_acc']:.2f}")
    finally:
        writer.close()
        checkpointer.close()
        preemption.restore()
    if not preemption.requested and jax.process_index() == 0:
        convert.save_checkpoint(nnx.merge(graphdef, params, rest), workdir / "model")
        plot_losses(metrics_path, workdir / "loss.png")
    return logged
