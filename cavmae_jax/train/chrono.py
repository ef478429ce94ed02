"""Training throughput on a clock that runs only while updates do: the first update of a
process and of each phase (which compiles its step) is timed apart, and evaluation and
checkpoint saving pause the clock."""

from __future__ import annotations

import contextlib
import time


class Chrono:
    """Clips/s, TFLOP/s and MFU between two logs, from update time only."""

    def __init__(self, step: int, batch: int, flops_at, peak_tflops: float | None):
        """``flops_at(update)``: training FLOPs per clip of that update (phases differ)."""
        self.batch, self.flops_at, self.peak = batch, flops_at, peak_tflops
        self.first_update_s: float | None = None
        self._restart(step)

    def _restart(self, step: int) -> None:
        self.mark, self.mark_step, self.paused_s = time.perf_counter(), step, 0.0

    def first_update_done(self, step: int) -> None:
        """After the first update has finished (its result waited for): its time, which
        includes compiling the step, is kept apart, and the clock starts from here."""
        self.first_update_s = time.perf_counter() - self.mark - self.paused_s
        self._restart(step)

    @contextlib.contextmanager
    def paused(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - start

    def rates(self, step: int, devices: int) -> dict[str, float]:
        """The rates since the last call (none when no update ran on the clock since), and
        the first update's seconds once; MFU only when the device's peak is known."""
        rates = {}
        if self.first_update_s is not None:
            rates["first_update_s"], self.first_update_s = self.first_update_s, None
        if step > self.mark_step:
            seconds = time.perf_counter() - self.mark - self.paused_s
            clips_per_s = (step - self.mark_step) * self.batch / seconds
            flops = sum(self.flops_at(s) for s in range(self.mark_step + 1, step + 1))
            rates.update(clips_per_s=clips_per_s, tflops=flops * self.batch / seconds / 1e12)
            if self.peak:
                rates["mfu"] = rates["tflops"] / (self.peak * devices)
        self._restart(step)
        return rates
