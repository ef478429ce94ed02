"""The training loop shared by pretraining and finetuning: sharded state, steps, metrics,
checkpoints, resume.

A run in ``workdir`` resumes by itself from the newest checkpoint (parameters, optimizer state,
step, and any extra state such as the weight-averaging sum); the data stream restarts at the same
batch (the loader is keyed by batch index) and the random key of step ``s`` is
``fold_in(seed, s)``, so a resumed run ends with the same parameters as an uninterrupted one.
SIGTERM saves a checkpoint at the next step boundary and exits.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from cavmae_jax import convert
from cavmae_jax.train import sharding
from cavmae_jax.train.checkpoint import Checkpointer, PreemptionFlag
from cavmae_jax.train.metrics import MetricsWriter
from cavmae_jax.train.optim import make_optimizer, multistep_schedule, warmup_cosine


def prepared_dataset(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    """The prepared dataset ``config.data.dir``; with ``config.data.generate`` the demo videos
    are first generated and prepared (resumably) under ``workdir/data``."""
    from input_pipeline import prepare, synthetic

    data = config.data
    if not data.dir and not data.generate:
        raise ValueError("no training data: set --config.data.dir to a `cavmae prepare` output")
    data_dir = Path(data.dir) if data.dir else workdir / "data" / "dataset"
    if data.generate and not (data_dir / "dataset_info.json").exists():
        videos = workdir / "data" / "videos"
        listing = videos / "clips.csv"
        if not listing.exists():
            synthetic.generate(videos, clips=data.clips, classes=data.classes, seed=config.seed)
        prepare.prepare(listing, data_dir, labels=videos / "labels.csv", workers=data.workers)
    return data_dir


def learning_rate(config: ml_collections.ConfigDict, steps_per_epoch: int):
    """The official per-epoch MultiStep schedule, or warmup + cosine (``config.schedule``)."""
    if config.schedule == "cosine":
        return warmup_cosine(config.lr, config.warmup_steps, config.num_steps)
    return multistep_schedule(
        config.lr, steps_per_epoch, config.lr_decay_start, config.lr_decay_every, config.lr_decay
    )


@dataclasses.dataclass
class TrainState:
    """A sharded model split for jitted steps, with its optimizer."""

    mesh: Mesh
    graphdef: nnx.GraphDef
    params: Any  # trainable nnx.Param leaves
    rest: Any  # fixed tables
    param_shardings: Any
    opt_state: Any
    opt_shardings: Any
    tx: Any
    schedule: Callable

    def model(self, params=None) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params if params is None else params, self.rest)


def copy_weights(source: nnx.Module, target: nnx.Module, name: str) -> None:
    """Overwrite ``target``'s values with ``source``'s, keeping ``target``'s variable kinds
    (trainable or fixed) and sharded layout; sizes must agree."""
    values = nnx.to_pure_dict(nnx.state(source))
    state = nnx.state(target)
    expected = nnx.to_pure_dict(state)
    if jax.tree.structure(values) != jax.tree.structure(expected):
        raise ValueError(f"{name}: holds a {type(source).__name__} that does not match the "
                         f"configured {type(target).__name__} (other depths or parts)")  # fmt: skip
    for (path, value), (_, want) in zip(
        jax.tree_util.tree_leaves_with_path(values), jax.tree_util.tree_leaves_with_path(expected),
        strict=True,
    ):  # fmt: skip
        if value.shape != want.shape:
            raise ValueError(
                f"{name}: {jax.tree_util.keystr(path)} has shape {value.shape}, the configured "
                f"model expects {want.shape} (set --config.model.* to the checkpoint's sizes)"
            )
    shardings = jax.tree.map(lambda x: x.sharding, expected)
    nnx.replace_by_pure_dict(state, jax.device_put(values, shardings))
    nnx.update(target, state)


def build_state(
    config: ml_collections.ConfigDict,
    make_model: Callable[[], nnx.Module],
    steps_per_epoch: int,
    load_init: Callable[[str], nnx.Module] | None = None,
    **optimizer_options,
) -> TrainState:
    """Model created sharded on the mesh of ``config.mesh`` (then overwritten with
    ``load_init(config.init)`` if set), optimizer state created in the parameters' layout."""
    mesh = sharding.make_mesh(config.mesh.to_dict())
    sharding.check_batch_size(config.batch_size, mesh)
    rules = sharding.RULES[config.sharding]
    model = sharding.create_sharded(make_model, mesh, rules)
    if config.init:
        copy_weights(load_init(config.init), model, config.init)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    param_shardings = sharding.state_shardings(params, mesh, rules)
    schedule = learning_rate(config, steps_per_epoch)
    tx = make_optimizer(
        schedule, params, config.optimizer, config.weight_decay, clip_norm=config.clip_norm,
        accumulate=config.grad_accum, **optimizer_options,
    )  # fmt: skip
    opt_shardings = sharding.optimizer_shardings(tx, params, param_shardings)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    return TrainState(
        mesh, graphdef, params, rest, param_shardings, opt_state, opt_shardings, tx, schedule
    )


def keep_lines_until(path: Path, step: int) -> None:
    """On resume, drop JSON lines logged after the checkpoint (they will be logged again)."""
    if path.exists():
        lines = [x for x in path.read_text().splitlines() if json.loads(x)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


@dataclasses.dataclass
class Hooks:
    """What differs between pretraining and finetuning around the shared loop."""

    batches_from: Callable[[int], Iterator[dict]]  # start batch -> host batches
    batch_keys: tuple[str, ...]
    clip_flops: float  # training FLOPs per clip, for TFLOP/s and MFU
    extra_state: dict = dataclasses.field(default_factory=dict)  # checkpointed with params
    after_step: Callable[[int, dict], None] | None = None  # (step, state); may update state
    on_start: Callable[[int, dict], None] | None = None  # (start step, state) after any restore
    # a step over the whole state, (state, rest, batch, key, step) -> (state, metrics), for runs
    # that train more than params and optimizer state (PCAV-MAE's momentum encoder)
    state_step: Callable | None = None
    shown: tuple[str, ...] = ("loss",)  # metrics on the progress bar


def train(config: ml_collections.ConfigDict, workdir: Path, ts: TrainState, step_fn: Callable,
          hooks: Hooks) -> tuple[dict, dict[str, float], bool]:  # fmt: skip
    """Run steps up to ``config.num_steps``, resuming from ``workdir/checkpoints``. Metrics are
    appended to ``workdir/metrics.jsonl`` every ``config.log_every`` steps. Returns the final
    state dict (``params``, ``opt_state``, extra state), the last logged metrics and whether
    the run finished (False after SIGTERM)."""
    state = {"params": ts.params, "opt_state": ts.opt_state, **hooks.extra_state}
    checkpointer = Checkpointer(workdir / "checkpoints", config.keep_checkpoints)
    start = checkpointer.latest_step() or 0
    if start:
        state, _ = checkpointer.restore(start, state)
    for name in ("metrics.jsonl", "validation.jsonl"):
        keep_lines_until(workdir / name, start)
    if hooks.on_start:
        hooks.on_start(start, state)
    batches = hooks.batches_from(start)
    key = jax.random.key(config.seed)
    preemption = PreemptionFlag()
    logged: dict[str, float] = {}
    clock, clock_step = time.perf_counter(), start
    writer = MetricsWriter(workdir, active=jax.process_index() == 0)

    def log_metrics(step: int, metrics: dict) -> dict[str, float]:
        """Write the step's metrics with rates since the last log; stop on a non-finite one."""
        nonlocal clock, clock_step
        values = {name: float(value) for name, value in metrics.items()}
        if not all(math.isfinite(v) for v in values.values()):
            raise FloatingPointError(f"non-finite metrics at step {step}: {values}")
        now = time.perf_counter()
        clips_per_s = (step - clock_step) * config.batch_size / (now - clock)
        tflops = clips_per_s * hooks.clip_flops / 1e12
        mfu = tflops / (config.peak_tflops * ts.mesh.size)
        values.update(step=step, lr=float(ts.schedule(step - 1)), clips_per_s=clips_per_s,
                      tflops=tflops, mfu=mfu)  # fmt: skip
        clock, clock_step = now, step
        writer.write(step, values)
        return values

    try:
        with tqdm(initial=start, total=config.num_steps, disable=jax.process_index()) as bar:
            for step in range(start + 1, config.num_steps + 1):
                local = next(batches)
                batch = sharding.global_batch({k: local[k] for k in hooks.batch_keys}, ts.mesh)
                step_key = jax.random.fold_in(key, step)
                if hooks.state_step:
                    state, metrics = hooks.state_step(state, ts.rest, batch, step_key, step)
                else:
                    state["params"], state["opt_state"], metrics = step_fn(
                        state["params"], ts.rest, state["opt_state"], batch, step_key
                    )
                bar.update()
                if hooks.after_step:
                    hooks.after_step(step, state)
                stop = preemption.requested  # read once: log, save and exit agree
                if step % config.log_every == 0 or step == config.num_steps:
                    logged = log_metrics(step, metrics)
                    bar.set_postfix({name: f"{logged[name]:.4f}" for name in hooks.shown})
                if step % config.checkpoint_every == 0 or step == config.num_steps or stop:
                    meta = {"step": step, "data_batch": step, "config": config.to_dict()}
                    checkpointer.save(step, state, meta, force=stop)
                if stop:
                    print(f"SIGTERM: saved step {step}, exiting")
                    break
    finally:
        writer.close()
        checkpointer.close()
        preemption.restore()
    return state, logged, not preemption.requested


def load_model(source: str, kind: str, **overrides) -> nnx.Module:
    """An official ``.pth`` (loaded non-strictly into ``kind``, as the official recipes) or a
    cavmae-jax model directory."""
    if source.endswith(".pth"):
        return convert.load_torch_checkpoint(source, kind=kind, **overrides)
    return convert.load_checkpoint(source)
