"""Throughput on update time only, and the MFU denominator by device kind."""

from __future__ import annotations

import time

import pytest

from cavmae_jax.peaks import peak_tflops
from cavmae_jax.train.chrono import Chrono


def test_the_peak_comes_from_the_device_kind_unless_configured():
    assert peak_tflops("TPU v5 lite") == 197.0 and peak_tflops("TPU v5p") == 459.0
    assert peak_tflops("TPU v6 lite") == 918.0 and peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and peak_tflops("TPU v4") == 275.0
    assert peak_tflops("cpu") is None and peak_tflops("cpu", configured=0.48) == 0.48
    assert peak_tflops("TPU v5 lite", configured=100.0) == 100.0


def test_compilation_evaluation_and_saving_are_off_the_clock():
    """A first update of 0.4 s (compiling), then two updates of 0.05 s around a 0.4 s pause
    (an evaluation): the rate is that of the two updates alone; the first update's seconds are
    reported once, apart; no MFU without a known peak."""
    chrono = Chrono(step=0, batch=8, clip_flops=1e9, peak_tflops=None)
    time.sleep(0.4)
    chrono.first_update_done(step=1)
    first = chrono.rates(step=1, devices=1)
    assert first["first_update_s"] == pytest.approx(0.4, abs=0.1) and "clips_per_s" not in first
    time.sleep(0.05)
    with chrono.paused():
        time.sleep(0.4)
    time.sleep(0.05)
    rates = chrono.rates(step=3, devices=1)
    assert rates["clips_per_s"] == pytest.approx(2 * 8 / 0.1, rel=0.3)
    assert rates["tflops"] == pytest.approx(rates["clips_per_s"] * 1e-3)
    assert "mfu" not in rates and "first_update_s" not in rates
    known = Chrono(step=0, batch=8, clip_flops=1e9, peak_tflops=0.5)
    time.sleep(0.05)
    rates = known.rates(step=1, devices=2)
    assert rates["mfu"] == pytest.approx(rates["tflops"] / (0.5 * 2))
