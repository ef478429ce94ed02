"""Training checkpoints: Orbax CheckpointManager (async, keep N), resume, agreed preemption.

A checkpoint holds the train state and a JSON ``meta`` (step, data position, config), on disk
or in a bucket. Orbax writes each step into a temporary folder and renames it when complete
(in a bucket, where there is no rename, it writes a commit marker), so a checkpoint cut short
is never listed, hence never restored; one that is listed but does not restore is set aside.
"""

from __future__ import annotations

import signal
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from cavmae_jax import paths
from cavmae_jax.pth import CheckpointError


class Checkpointer:
    """Save / restore ``{"params", "opt_state"}`` trees plus JSON metadata under ``directory``."""

    def __init__(
        self,
        directory: paths.PathLike,
        max_to_keep: int = 3,
        asynchronous: bool = True,
        ocdbt: bool = True,
    ):
        # cleanup: a checkpoint cut short (no rename in a bucket: never marked committed) is
        # removed at start, so that its step can be written again
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=asynchronous,
            cleanup_tmp_directories=True,
        )
        self.directory = paths.path(directory)
        handlers = {
            "state": ocp.StandardCheckpointHandler(use_ocdbt=ocdbt),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_newest_readable(self, abstract_state: dict, step: int = 0) -> tuple[int, dict]:
        """(step, state) of the newest checkpoint that restores, or of ``step`` when given;
        (0, ``abstract_state``) when there is none. A checkpoint that fails to restore is named
        with the reason, moved aside to ``unreadable-<step>`` (kept for inspection, and its
        step can be saved again) and the one before it is tried. Checkpoints newer than a
        chosen ``step`` are moved aside to ``unused-<step>``: the run will save those steps."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if step:
            if step not in steps:
                raise CheckpointError(f"{self.directory}: no checkpoint of step {step} ({steps})")
            self._set_aside([s for s in steps if s > step], "unused")
            steps = [step]
        unreadable = []
        try:
            for candidate in steps:
                try:
                    return candidate, self.restore(candidate, abstract_state)[0]
                except Exception as error:  # any failure of the files: report, fall back
                    reason = next(iter(str(error).strip().splitlines()), type(error).__name__)
                    print(f"{self.directory}/{candidate}: unreadable checkpoint ({reason[:200]})")
                    unreadable.append(candidate)
        finally:
            self._set_aside(unreadable, "unreadable")
        if steps:
            raise CheckpointError(f"{self.directory}: no readable checkpoint among steps {steps}")
        return 0, abstract_state

    def _set_aside(self, steps: list[int], label: str) -> None:
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                (self.directory / str(step)).rename(self.directory / f"{label}-{step}")
        multihost_utils.sync_global_devices("checkpoints set aside")
        self.manager.reload()

    def save(self, step: int, state: dict, meta: dict[str, Any], force: bool = False) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
        """The state at ``step`` in the layout (shapes, shardings) of ``abstract_state``."""
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            abstract_state,
        )
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        )
        restored = self.manager.restore(step, args=args)
        return restored["state"], restored["meta"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class Preemption:
    """Whether to save and stop after this step, the same answer on every process.

    One process: SIGTERM, caught here, stops it after the step it is in. Several processes
    (``jax.distributed``): JAX's preemption service catches SIGTERM in any of them and the
    coordination service makes all of them agree on one step (one past the furthest any has
    reached), so every process saves that same step and exits, and no collective save waits on
    a process that has gone. Call ``due(step)`` after every step, on every process."""

    def __init__(self):
        self.distributed = jax.process_count() > 1
        self.requested = False
        if not self.distributed:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def due(self, step: int) -> bool:
        if self.distributed and not self.requested:
            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self) -> None:
        if not self.distributed:
            signal.signal(signal.SIGTERM, self._previous)
