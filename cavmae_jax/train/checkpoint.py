"""Training checkpoints: Orbax CheckpointManager (async, keep N), resume, agreed preemption.

A checkpoint holds the train state and a JSON ``meta`` (step, data position, config), on disk
or in a bucket. Orbax writes each step into a temporary folder and renames it when complete
(in a bucket, where there is no rename, it writes a commit marker), so a checkpoint cut short
is never listed, hence never restored. One that is listed but whose files do not read (a
data error: ``data_error``) is set aside, and the one before it is tried; a checkpoint saved
from another state layout (another optimizer chain, model size or trainer) stops the run with
one line and touches nothing, and so does any other failure (out of memory, a network error).
"""

from __future__ import annotations

import json
import signal
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from cavmae_jax import paths
from cavmae_jax.errors import UserError
from cavmae_jax.pth import CheckpointError

# What TensorStore and Orbax say when a checkpoint's files are damaged or missing; any other
# failure to restore (memory, network, a changed layout) leaves the checkpoint where it is.
_DATA_ERRORS = ("DATA_LOSS", "NOT_FOUND", "Error reading", "Error decoding", "corrupt", "Corrupt")
_DATA_ERRORS += ("Unexpected end", "checksum", "Checksum", "truncated", "Truncated")


def data_error(error: BaseException | None) -> bool:
    """Whether ``error``, or one it was raised from (Orbax wraps TensorStore's), says that a
    checkpoint's files are damaged or missing."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, FileNotFoundError | json.JSONDecodeError | UnicodeDecodeError):
            return True
        if any(sign in str(error) for sign in _DATA_ERRORS):
            return True
        error = error.__cause__ or error.__context__
    return False


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
        self.handlers = {
            "state": ocp.StandardCheckpointHandler(use_ocdbt=ocdbt),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=self.handlers
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_newest_readable(
        self, abstract_state: dict, step: int = 0, config: dict | None = None
    ) -> tuple[int, dict]:
        """(step, state) of the newest checkpoint that restores, or of ``step`` when given;
        (0, ``abstract_state``) when there is none. A checkpoint whose files do not read is
        named with the reason, moved aside to ``unreadable-<step>`` (kept for inspection, and
        its step can be saved again) and the one before it is tried. Every process follows
        process 0's list of steps and each step's outcome is agreed: a read that fails on one
        process fails on all. Checkpoints newer than a chosen ``step`` are moved aside to
        ``unused-<step>``: the run will save those steps.
        A checkpoint of another state layout is a ``UserError`` naming the differences (and
        the settings that differ from ``config``, the run's)."""
        steps = _agreed(sorted(self.manager.all_steps(), reverse=True))
        if step:
            if step not in steps:
                raise CheckpointError(f"{self.directory}: no checkpoint of step {step} ({steps})")
            self.check_layout(step, abstract_state, config)
            self._set_aside([s for s in steps if s > step], "unused")
            steps = [step]
        unreadable = []
        try:
            for candidate in steps:
                restored, reason = None, None
                try:
                    self.check_layout(candidate, abstract_state, config)
                    restored = self.restore(candidate, abstract_state)[0]
                except Exception as error:
                    if isinstance(error, UserError) or not data_error(error):
                        raise
                    reason = next(iter(str(error).strip().splitlines()), type(error).__name__)
                if not _failed_anywhere(reason is not None):
                    return candidate, restored
                reason = reason or "unreadable on another process"
                print(f"{self.directory}/{candidate}: unreadable checkpoint ({reason[:200]})")
                unreadable.append(candidate)
        finally:
            self._set_aside(unreadable, "unreadable")
        if steps:
            raise CheckpointError(f"{self.directory}: no readable checkpoint among steps {steps}")
        return 0, abstract_state

    def check_layout(self, step: int, abstract_state: dict, config: dict | None = None) -> None:
        """A ``UserError`` naming the arrays that the checkpoint of ``step`` holds in another
        place or shape than ``abstract_state`` (read from its metadata, nothing restored),
        and the settings it was saved with that differ from ``config``."""
        try:
            saved = self.manager.item_metadata(step)["state"]
        except Exception as error:
            if data_error(error):
                raise
            return  # no metadata to compare: the restore itself will say
        want = {_key(path): tuple(leaf.shape) for path, leaf in _leaves(abstract_state)}
        have = {_key(path): tuple(leaf.shape) for path, leaf in _leaves(saved)}
        differences = [f"{k} only in the checkpoint" for k in sorted(have.keys() - want.keys())]
        differences += [f"{k} not in the checkpoint" for k in sorted(want.keys() - have.keys())]
        differences += [
            f"{k} is {have[k]} there, {want[k]} here"
            for k in sorted(want.keys() & have.keys())
            if want[k] != have[k]
        ]
        if differences:
            raise UserError(
                f"{self.directory}/{step}: saved from another state layout than this run's "
                f"({_few(differences)}){self._changed_settings(step, config)}; resume with "
                "the settings it was saved with, or start the changed run in a new workdir. "
                "Nothing was changed."
            )

    def _changed_settings(self, step: int, config: dict | None) -> str:
        """'; settings changed: name: saved -> now, ...' from the checkpoint's meta."""
        if config is None:
            return ""
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        saved = _flat(self.manager.restore(step, args=args)["meta"].get("config", {}))
        now = _flat(config)
        changed = [
            f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
            for k in sorted(saved.keys() | now.keys())
            if saved.get(k) != now.get(k)
        ]
        return f"; settings changed: {_few(changed)}" if changed else ""

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
        """The state at ``step`` in the layout (shapes, shardings) of ``abstract_state``, read
        by this process alone: the item handlers hold no barrier (the manager's restore ends
        in one, where a process whose read failed would leave the others waiting), so the
        processes agree on the outcome afterwards (``restore_newest_readable``)."""
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            abstract_state,
        )
        folder = self.directory / str(step)
        state = self.handlers["state"].restore(
            folder / "state", args=ocp.args.StandardRestore(target)
        )
        meta = self.handlers["meta"].restore(folder / "meta", args=ocp.args.JsonRestore())
        return state, meta

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _few(items: list[str], shown: int = 4) -> str:
    more = len(items) - shown
    return "; ".join(items[:shown]) + (f"; and {more} more" if more > 0 else "")


def _flat(tree: dict, prefix: str = "") -> dict:
    """A nested settings dict as {"model.attention": ...}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _leaves(tree) -> list:
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _key(path) -> str:
    """A tree path as names and indices joined by '/', whatever the container kinds (a saved
    tuple reads back as a list, a named tuple as a dict)."""
    parts = []
    for entry in path:
        for field in ("key", "idx", "name"):
            if hasattr(entry, field):
                parts.append(str(getattr(entry, field)))
                break
    return "/".join(parts)


def _agreed(steps: list[int]) -> list[int]:
    """Process 0's list of checkpoint steps, on every process (a bucket's listing can differ
    between hosts for a moment)."""
    if jax.process_count() == 1:
        return steps
    count = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
    mine = np.zeros(count, np.int32)
    mine[: min(count, len(steps))] = steps[:count]
    return [int(step) for step in multihost_utils.broadcast_one_to_all(mine)]


def _failed_anywhere(failed: bool) -> bool:
    """Whether ``failed`` holds on any process (each process reads its own shards)."""
    if jax.process_count() == 1:
        return failed
    flags = multihost_utils.process_allgather(jax.numpy.asarray(failed))
    return bool(flags.any())


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
