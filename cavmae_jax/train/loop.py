"""The pretraining loop: build the model and optimizer, run jitted steps, log, save the model."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import ml_collections
from flax import nnx
from tqdm import tqdm

from cavmae_jax import convert
from cavmae_jax.models import CAVMAE, ModelConfig
from cavmae_jax.train.optim import multistep_schedule, official_adam
from cavmae_jax.train.steps import make_pretrain_step


def training_batches(config: ml_collections.ConfigDict, workdir: Path):
    """Batches from the prepared dataset ``config.data.dir``; with ``config.data.generate`` the
    demo videos are first generated and prepared under ``workdir/data`` (resumably)."""
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
        batch_size=config.batch_size, num_classes=data.classes, seed=config.seed,
        noise=data.noise, shuffle_buffer=data.shuffle_buffer,
    )  # fmt: skip
    return iter(Loader(data_dir, "train", loader_config))


def pretrain(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, float]:
    """Pretrain ``CAVMAE`` for ``config.num_steps`` steps; metrics go to ``workdir/metrics.jsonl``
    and the final model to ``workdir/model`` (Orbax). Returns the last logged metrics."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig(**config.model.to_dict())
    model = CAVMAE(cfg, nnx.Rngs(config.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    schedule = multistep_schedule(
        config.lr, config.steps_per_epoch, config.lr_decay_start, config.lr_decay_every,
        config.lr_decay,
    )  # fmt: skip
    tx = official_adam(schedule, config.weight_decay)
    opt_state = tx.init(params)
    mask_kwargs = dict(
        mask_ratio_a=config.mask_ratio_a,
        mask_ratio_v=config.mask_ratio_v,
        mask_mode=config.mask_mode,
    )
    step_fn = make_pretrain_step(graphdef, tx, mask_kwargs)
    batches = training_batches(config, workdir)
    key = jax.random.key(config.seed)
    logged: dict[str, float] = {}
    start = time.perf_counter()
    with open(workdir / "metrics.jsonl", "a") as log, tqdm(total=config.num_steps) as bar:
        for step in range(1, config.num_steps + 1):
            batch = next(batches)
            batch = {"audio": batch["audio"], "image": batch["image"]}
            params, opt_state, metrics = step_fn(
                params, rest, opt_state, batch, jax.random.fold_in(key, step)
            )
            bar.update()
            if step % config.log_every and step != config.num_steps:
                continue
            logged = {name: float(value) for name, value in metrics.items()}
            if not all(math.isfinite(v) for v in logged.values()):
                raise FloatingPointError(f"non-finite metrics at step {step}: {logged}")
            elapsed = time.perf_counter() - start
            logged.update(step=step, lr=float(schedule(step - 1)),
                          clips_per_s=step * config.batch_size / elapsed)  # fmt: skip
            log.write(json.dumps(logged) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{logged['loss']:.4f}", c_acc=f"{logged['c_acc']:.2f}")
    convert.save_checkpoint(nnx.merge(graphdef, params, rest), workdir / "model")
    return logged
