"""The training loop of every trainer: batches, steps, evaluators, metrics, checkpoints, resume.

A run in ``workdir`` (local or ``gs://``) resumes by itself from the newest readable checkpoint
(the whole train state); the data stream restarts at the same batch (the loader is keyed by
batch index) and the random key of update s is ``fold_in(seed, s)``, so a resumed run ends with
the same parameters as an uninterrupted one. SIGTERM, to any process of a multi-process run,
saves a checkpoint of one agreed step on every process and exits.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
from tqdm import tqdm

from cavmae_jax import paths, peaks, sharding
from cavmae_jax.errors import RunStopped
from cavmae_jax.paths import Path
from cavmae_jax.train import durations as durations_lib
from cavmae_jax.train.checkpoint import Checkpointer, Preemption
from cavmae_jax.train.chrono import Chrono
from cavmae_jax.train.metrics import MetricsWriter
from cavmae_jax.train.profiling import StepProfiler
from cavmae_jax.train.setup import Setup, build


def _step_of(line: str) -> int | None:
    """The step of a logged line; None for a line cut short (a full disk, a killed run)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError):
        return None


def keep_lines_until(path: Path, step: int) -> None:
    """On resume, drop JSON lines logged after the checkpoint (they will be logged again) and
    any line cut short."""
    if path.exists():
        steps = [(line, _step_of(line)) for line in path.read_text().splitlines()]
        path.write_text("".join(f"{line}\n" for line, s in steps if s is not None and s <= step))


class Diverged(Exception):
    """Non-finite metrics at an update (the first such one)."""

    def __init__(self, step: int, values: dict[str, float]):
        super().__init__(step, values)
        self.step, self.values = step, values

    def explain(self, newest: int | None, workdir: Path) -> str:
        names = ", ".join(f"{k}={v}" for k, v in self.values.items())
        if newest:
            kept = f"newest checkpoint kept: step {newest} in {workdir}/checkpoints"
            again = "resumes from there"
        else:
            kept, again = "no checkpoint kept yet", "starts over"
        return (
            f"diverged at step {self.step} ({names}); {kept}. Try a lower --config.lr (the "
            f"same command with it {again}), or --config.clip_norm=1.0 in a new workdir (it "
            "changes the optimizer state)"
        )


@jax.jit
def _watch(first_bad: jax.Array, bad_metrics: dict, metrics: dict, step: jax.Array):
    """On the device, without waiting for the step: the first update whose metrics were not
    all finite (0: none yet) and its metrics."""
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in metrics.values()]))
    new = (first_bad == 0) & ~finite
    kept = jax.tree.map(lambda old, now: jnp.where(new, now, old), bad_metrics, metrics)
    return jnp.where(new, step, first_bad), kept


def evaluate(setup: Setup, state: dict, due: list, step: int, workdir: Path) -> dict:
    """Run the ``due`` evaluators; their scalars come back as ``name/metric``, anything else
    (per-class lists) goes to ``workdir/<name>/step_<S>.json`` (process 0)."""
    scalars = {}
    for name, _, evaluator in due:
        result = evaluator.run(state)
        numbers = {k: v for k, v in result.items() if isinstance(v, int | float)}
        scalars.update({f"{name}/{k}": v for k, v in numbers.items()})
        if len(numbers) < len(result) and jax.process_index() == 0:
            folder = workdir / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"step_{step}.json").write_text(json.dumps({"step": step, **result}))
    return scalars


def refresh_and_evaluate(setup: Setup, state: dict, step: int, workdir: Path) -> tuple[dict, dict]:
    """After update ``step`` (0: before the first of a fresh run), the trainer's refreshes that
    are due (they change the state), then the evaluators that are (they read it); their
    scalars come back as ``name/metric``."""
    total = setup.durations.num_steps

    def due(period) -> bool:
        return period.at_start if step == 0 else period.due(step, total)

    scalars = {}
    for name, period, refresh in setup.refreshes:
        if due(period):
            state, result = refresh(state)
            scalars.update({f"{name}/{k}": v for k, v in result.items()})
    evaluators = [e for e in setup.evaluators if due(e[1])]
    if evaluators:
        scalars.update(evaluate(setup, state, evaluators, step, workdir))
    return state, scalars


def train(setup: Setup, state: dict, workdir: Path) -> tuple[dict, dict[str, float], bool]:
    """Run updates up to ``setup.durations.num_steps``, resuming from ``workdir/checkpoints``
    into ``state`` (its shapes and shardings) or starting from ``setup.fresh_state()``.
    Metrics (the step's and those of the refreshes and evaluators that ran) are appended to
    ``workdir/metrics.jsonl`` every ``config.log_every`` updates and whenever an evaluator ran.
    Returns the final state, the last logged metrics and whether the run finished (False after
    SIGTERM)."""
    config, total = setup.config, setup.durations.num_steps
    checkpointer = Checkpointer(
        workdir / "checkpoints", config.keep_checkpoints, ocdbt=config.checkpoint_ocdbt
    )
    start, state = checkpointer.restore_newest_readable(
        state, config.restore_step, config.to_dict()
    )
    if not start:
        state = setup.fresh_state()
    elif jax.process_index() == 0:
        print(f"resuming from the checkpoint of step {start}")
    first = jax.process_index() == 0  # the one process that writes the run's files
    if first:
        keep_lines_until(workdir / "metrics.jsonl", start if start else -1)
    writer = MetricsWriter(workdir, active=first)
    if start == 0:
        state, scalars = refresh_and_evaluate(setup, state, 0, workdir)
        if scalars:
            writer.write(0, {"step": 0, **scalars})
    batches = sharding.batches_ahead(
        setup.batches_from(start), setup.trainer.batch_keys, setup.mesh
    )
    preemption = Preemption()
    logged: dict[str, float] = {}
    kind = setup.mesh.devices.flat[0].device_kind
    peak = peaks.peak_tflops(kind, config.peak_tflops)
    if peak is None and jax.process_index() == 0:
        print(f"MFU not logged: no peak FLOP/s known for {kind}; set --config.peak_tflops")
    chrono = Chrono(start, config.batch_size, setup.flops_at, peak)
    profile = config.profile
    profiler = StepProfiler(workdir / "profile", profile.start_step, profile.steps)
    first_bad, bad_metrics = jnp.zeros((), jnp.int32), None
    pending = None  # (step, metrics, evaluated) of a logged update not yet fetched

    def raise_if_diverged(bad: int, values: dict) -> None:
        if bad:
            raise Diverged(bad, {k: float(v) for k, v in values.items() if not math.isfinite(v)})

    def check_finite() -> None:
        """Before a checkpoint is saved: stop at the first non-finite update, so that no
        checkpoint holds what a diverged update made."""
        raise_if_diverged(*jax.device_get((first_bad, bad_metrics)))

    def log_pending(bar) -> None:
        """Write the pending log: its metrics, the watch of every update so far and the rates
        since the last log, fetched in one transfer. Called once the next update has been
        dispatched, so the fetch never stalls the device."""
        nonlocal pending, logged
        if pending is None:
            return
        step, metrics, evaluated = pending
        pending = None
        values, bad, bad_values = jax.device_get((metrics, first_bad, bad_metrics))
        raise_if_diverged(bad, bad_values)
        logged = {name: float(value) for name, value in values.items()}
        logged.update(step=step, **chrono.rates(step, setup.mesh.size), **evaluated)
        writer.write(step, logged)
        shown = [name for name in setup.trainer.shown if name in logged]
        bar.set_postfix({name: f"{logged[name]:.4f}" for name in shown})

    try:
        with tqdm(initial=start, total=total, disable=jax.process_index()) as bar:
            for step in range(start + 1, total + 1):
                batch = next(batches)
                with profiler.update(step):
                    state, metrics = setup.step_at(step)(state, batch)
                profiler.updated(step, metrics)
                if bad_metrics is None:
                    bad_metrics = jax.tree.map(jnp.zeros_like, metrics)
                first_bad, bad_metrics = _watch(first_bad, bad_metrics, metrics, jnp.int32(step))
                if step == start + 1 or setup.step_at(step) is not setup.step_at(step - 1):
                    jax.block_until_ready(metrics)  # the update that compiled its step
                    chrono.first_update_done(step)
                log_pending(bar)
                bar.update()
                with chrono.paused():
                    state, evaluated = refresh_and_evaluate(setup, state, step, workdir)
                stop = preemption.due(step)  # the same step on every process
                saving = step % config.checkpoint_every == 0 or step == total or stop
                if step % config.log_every == 0 or step == total or evaluated:
                    pending = (step, metrics, evaluated)
                if saving:
                    log_pending(bar)
                    check_finite()
                    meta = {"step": step, "config": config.to_dict()}
                    with chrono.paused():
                        checkpointer.save(step, state, meta, force=stop)
                if stop:
                    print(f"SIGTERM: saved step {step}, exiting")
                    break
            log_pending(bar)
    except Diverged as diverged:
        checkpointer.manager.wait_until_finished()
        raise RunStopped(diverged.explain(checkpointer.latest_step(), workdir)) from None
    finally:
        profiler.stop()
        writer.close()
        checkpointer.close()
        preemption.restore()
    return state, logged, not preemption.requested


def run(config: ml_collections.ConfigDict, workdir: paths.PathLike) -> dict:
    """Train ``config.trainer`` in ``workdir`` (resuming if possible), then let the trainer
    finish (save the model, final evaluation). Returns the last logged metrics, updated with
    the trainer's final result."""
    workdir = paths.path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    setup, state = build(config, workdir, fresh=False)
    if jax.process_index() == 0:
        print(setup.durations.summary())
        print(durations_lib.schedule_summary(config, setup.durations))
    state, logged, finished = train(setup, state, workdir)
    if not finished:
        return logged
    return {**logged, **setup.trainer.finish(setup, state, workdir)}
