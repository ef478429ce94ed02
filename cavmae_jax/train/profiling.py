"""A ``jax.profiler`` trace of chosen updates (``config.profile``), for TensorBoard's profile
plugin or Perfetto: ``start_step`` is the first traced update, ``steps`` how many (0: none)."""

from __future__ import annotations

import contextlib

import jax


class StepProfiler:
    """Traces updates ``start_step .. start_step + steps - 1`` into ``directory``, each marked
    as one step of the trace (``StepTraceAnnotation``)."""

    def __init__(self, directory, start_step: int, steps: int):
        self.directory, self.first, self.last = str(directory), start_step, start_step + steps - 1
        self.tracing = False

    @contextlib.contextmanager
    def update(self, step: int):
        """Around update ``step``: the trace starts before the first traced one."""
        if self.first <= step <= self.last and not self.tracing:
            jax.profiler.start_trace(self.directory)
            self.tracing = True
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            yield

    def updated(self, step: int, outputs) -> None:
        """After update ``step``: the trace ends once the last traced one's ``outputs`` are
        ready."""
        if self.tracing and step >= self.last:
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False
