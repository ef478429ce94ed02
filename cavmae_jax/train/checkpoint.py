"""Training checkpoints: Orbax CheckpointManager (async, keep N), resume, save on SIGTERM.

A checkpoint holds the trainable parameters, the optimizer state and a JSON ``meta`` (step, data
position, config). Orbax writes each step into a temporary folder and renames it when complete,
so a checkpoint interrupted while being written is never listed, hence never restored.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Save / restore ``{"params", "opt_state"}`` trees plus JSON metadata under ``directory``."""

    def __init__(self, directory: str | Path, max_to_keep: int = 3, asynchronous: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=asynchronous
        )
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

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


class PreemptionFlag:
    """Set when SIGTERM arrives, so the loop can save at the next step boundary and exit."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)
