"""Fbank against torchaudio's Kaldi fbank fixtures, kaldi-native-fbank, and the JAX version."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import DATA

from input_pipeline import audio

FIXTURES = np.load(DATA / "fbank_fixtures.npz")
SIGNALS = sorted({key.split("__")[0] for key in FIXTURES.files})
TOL = 1e-4  # absolute, log domain
# The fixtures are torchaudio's float32 computation. In bins more than ~12 nats below their
# frame's loudest bin, the value is dominated by float32 rounding of torch's FFT (torch 2.13's
# own FFT differs from the fixtures by 5e-3 there); near the top, the float32 mel weights carry
# 1-ulp differences of torch's vectorised log. Hence: 1e-4 on average, 2e-4 near the
# frame peak, 5e-3 anywhere.
NEAR_PEAK = -12.0


def assert_close_to_torchaudio(ours: np.ndarray, theirs: np.ndarray, peak_tol=2e-4) -> None:
    diff = np.abs(ours - theirs)
    near_peak = theirs - theirs.max(axis=1, keepdims=True) >= NEAR_PEAK
    assert diff.max() <= 5e-3
    assert diff[near_peak].max() <= peak_tol
    assert diff.mean() <= TOL


@pytest.mark.parametrize("name", SIGNALS)
def test_fbank_matches_torchaudio_fixtures(name):
    wav = FIXTURES[f"{name}__waveform"]
    raw = FIXTURES[f"{name}__fbank"]
    frames = audio.num_frames(len(wav))
    assert frames == len(raw)
    padded = audio.compute_fbank(wav)
    assert padded.shape == (1024, 128) and padded.dtype == np.float32
    kept = min(frames, 1024)
    assert_close_to_torchaudio(padded[:kept], raw[:kept])
    expected = FIXTURES[f"{name}__fbank_1024"]
    np.testing.assert_array_equal(padded[kept:], expected[kept:])  # zero padding
    assert_close_to_torchaudio(padded[:kept], expected[:kept])
    normalized = audio.normalize_fbank(padded)
    reference = FIXTURES[f"{name}__normalized"]
    np.testing.assert_allclose(normalized[kept:], reference[kept:], atol=1e-6)
    assert_close_to_torchaudio(normalized[:kept] * 4.4849, reference[:kept] * 4.4849)


def test_empty_mel_filter_is_log_eps():
    fb = audio.compute_fbank(FIXTURES["chirp_10s__waveform"])
    np.testing.assert_array_equal(fb[:998, 3], np.float32(np.log(np.float32(1.1920929e-07))))


@pytest.mark.parametrize("name", ["chirp_10s", "tone_2s_dc", "noise_12s", "am_10s_int16"])
def test_jax_fbank_equals_numpy(name):
    wav = FIXTURES[f"{name}__waveform"]
    # compiled at XLA's default backend optimisation (level 3), as a user's run is: the suite
    # compiles at level 0 (conftest.py), where the log-mel values move by up to 0.0065
    default = {"xla_backend_optimization_level": 3}
    ours = np.asarray(jax.jit(audio.jax_fbank).lower(wav).compile(default)(wav))
    reference = audio.compute_fbank(wav)
    assert ours.shape == reference.shape == (1024, 128)
    assert_close_to_torchaudio(ours, reference)


@pytest.mark.parametrize("bins", [23, 80, 120])
def test_fbank_matches_kaldi_native_fbank(bins):
    import kaldi_native_fbank as knf

    wav = FIXTURES["chirp_10s__waveform"]
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = 16000
    opts.frame_opts.dither = 0
    opts.frame_opts.window_type = "hanning"
    opts.mel_opts.num_bins = bins
    opts.use_energy = False
    opts.htk_compat = True
    fbank = knf.OnlineFbank(opts)
    centred = wav - wav.mean()
    fbank.accept_waveform(16000, centred.tolist())
    fbank.input_finished()
    theirs = np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])
    ours = audio.compute_fbank(wav, num_mel_bins=bins, target_length=len(theirs))
    # kaldi-native-fbank computes its float32 mel weights its own way: looser near filter edges.
    assert_close_to_torchaudio(ours, theirs, peak_tol=2e-3)


def test_normalisation_constants_and_padding_value():
    assert audio.normalize_fbank(np.zeros((1, 1)))[0, 0] == pytest.approx(5.081 / 4.4849)
    assert audio.normalize_fbank(np.ones((1, 1)), mean=-4.27, std=4.57)[0, 0] == pytest.approx(
        5.27 / 4.57
    )


CLIP = DATA / "00W1lcxW-WU_40.000.mp4"  # AAC 44.1 kHz stereo, 10 s


def test_load_audio_resamples_to_16k_and_keeps_the_first_channel():
    wav = audio.load_audio(CLIP)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) - 160000) < 1000  # 10 s at 16 kHz
    assert np.all(np.abs(wav) <= 1.0)
    np.testing.assert_array_equal(wav * 32768, np.round(wav * 32768))  # 16-bit levels
    fb = audio.compute_fbank(wav)
    assert fb.shape == (1024, 128) and np.isfinite(fb).all()


def test_load_audio_reports_unreadable_files(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(audio.AudioError, match="notes.mp4: cannot open"):
        audio.load_audio(text)
    with pytest.raises(audio.AudioError, match="missing.mp4: cannot open"):
        audio.load_audio(tmp_path / "missing.mp4")


def test_stereo_audio_keeps_the_first_channel_not_the_mean(tmp_path):
    """Official extraction is sox ``remix 1``: a noisy right channel must not leak in."""
    from input_pipeline import synthetic

    synthetic.write_clip(tmp_path / "stereo.mp4", cls=0, seed=0, sample_rate=48000, stereo=True)
    wav = audio.load_audio(tmp_path / "stereo.mp4")
    high = audio.compute_fbank(wav)[:900, 100:].mean()  # class 0 is a 300 Hz tone: few highs
    assert high < -1.5  # about -3 for the left channel; the channel mean gives about +2
