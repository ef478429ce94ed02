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
    chrono = Chrono(step=0, batch=8, flops_at=lambda update: 1e9, peak_tflops=None)
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
    known = Chrono(step=0, batch=8, flops_at=lambda update: 1e9, peak_tflops=0.5)
    time.sleep(0.05)
    rates = known.rates(step=1, devices=2)
    assert rates["mfu"] == pytest.approx(rates["tflops"] / (0.5 * 2))


def test_tflops_follow_the_phase_of_each_update():
    """PCAV-MAE drops its decoder after some epochs: updates 1-2 count 3 GFLOP per clip, 3-4
    count 1; a log over updates 2-4 counts 3 + 1 + 1."""
    chrono = Chrono(
        step=1, batch=2, flops_at=lambda update: 3e9 if update <= 2 else 1e9, peak_tflops=None
    )
    time.sleep(0.1)
    rates = chrono.rates(step=4, devices=1)
    seconds = 3 * 2 / rates["clips_per_s"]
    assert rates["tflops"] == pytest.approx((3e9 + 1e9 + 1e9) * 2 / seconds / 1e12)


def test_the_pcav_phases_count_the_decoder_only_while_it_trains():
    """Without the decoder a PCAV-MAE update costs the decoder's forward and backward less;
    the warm-up (no prototypes) costs no momentum encoder."""
    from cavmae_jax import flops
    from cavmae_jax.config_loading import load_config
    from cavmae_jax.models.pcav_mae import pcav_config
    from cavmae_jax.train.pcav import PCAVPretraining

    config = load_config("configs/pcav.py:as")
    cfg = pcav_config(**config.model.to_dict())
    warmup, with_decoder, encoders = PCAVPretraining().clip_flops(config, cfg)
    ratios = (config.mask_ratio_a, config.mask_ratio_v)
    decoder = flops.pretrain_step(cfg, *ratios)
    decoder -= flops.pretrain_step(cfg.replace(decoder_depth=0), *ratios)
    assert decoder > 0 and with_decoder - encoders == decoder
    # the warm-up runs no momentum encoder; the phases' order follows the option
    assert with_decoder - warmup == flops.features_forward(cfg)
    config.pcav.decoder_first = False
    assert PCAVPretraining().clip_flops(config, cfg) == (warmup, encoders, with_decoder)
