"""Audio: decode to 16 kHz mono with PyAV, Kaldi-compatible log-Mel fbank (NumPy and JAX).

Decoding reproduces the official extraction (ffmpeg ``-ar 16000`` to 16-bit PCM, then sox
``remix 1``: the first channel, not the channel mean). The fbank is
``torchaudio.compliance.kaldi.fbank`` with the official arguments (official behaviour 19):
25 ms Hann window, 10 ms shift, DC removal, pre-emphasis 0.97, |FFT(512)|^2, Kaldi mel bank,
log floored at eps.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
FRAME_LENGTH = 400  # 25 ms
FRAME_SHIFT = 160  # 10 ms
FFT_SIZE = 512
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
LOG_FLOOR = float(np.finfo(np.float32).eps)
DATASET_MEAN = -5.081  # AudioSet / VGGSound statistics used by every official recipe
DATASET_STD = 4.4849
AUDIOSET_NORM = (DATASET_MEAN, DATASET_STD)


class AudioError(ValueError):
    """A file whose audio cannot be used; the message names the file and the reason."""


class NoAudioTrack(AudioError):
    """A file without an audio stream (a silent video)."""


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """First channel of the file's first audio stream, resampled to ``sample_rate``, as float32
    in [-1, 1) with 16-bit resolution (what the official wav files hold). Shape [N]."""
    import av

    path = Path(path)
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as err:
        raise AudioError(f"{path}: cannot open: {err}") from err
    with container:
        if not container.streams.audio:
            raise NoAudioTrack(f"{path}: no audio stream")
        stream = container.streams.audio[0]
        resampler = None
        chunks = []
        try:
            for frame in container.decode(stream):
                if resampler is None:
                    resampler = av.AudioResampler(
                        format="s16p", layout=frame.layout, rate=sample_rate
                    )
                chunks.extend(out.to_ndarray()[0] for out in resampler.resample(frame))
            if resampler is not None:
                chunks.extend(out.to_ndarray()[0] for out in resampler.resample(None))
        except av.error.FFmpegError as err:
            raise AudioError(f"{path}: audio stream is corrupt: {err}") from err
    if not chunks:
        raise AudioError(f"{path}: the audio stream decodes to no samples")
    return np.concatenate(chunks).astype(np.float32) / 32768.0


def mel_scale(freq: float) -> float:
    """Kaldi's mel scale, 1127 ln(1 + f / 700), in double precision (for scalars)."""
    return 1127.0 * math.log(1.0 + freq / 700.0)


def mel_banks(num_bins: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Kaldi triangular mel filters [num_bins, FFT_SIZE // 2 + 1] (the Nyquist column is zero).

    Evaluated in float32 with torchaudio's operation order: near a filter's edge the slope is a
    difference of nearly equal mel values, where float32 and float64 differ visibly in the log.
    """
    f32 = np.float32
    mel_low, mel_high = mel_scale(LOW_FREQ), mel_scale(sample_rate / 2)
    delta = f32((mel_high - mel_low) / (num_bins + 1))
    index = np.arange(num_bins, dtype=f32)[:, None]
    left = f32(mel_low) + index * delta
    centre = f32(mel_low) + (index + f32(1)) * delta
    right = f32(mel_low) + (index + f32(2)) * delta
    freqs = f32(sample_rate / FFT_SIZE) * np.arange(FFT_SIZE // 2, dtype=f32)
    mel = (f32(1127.0) * np.log(f32(1) + freqs / f32(700)))[None, :]
    up = (mel - left) / (centre - left)
    down = (right - mel) / (right - centre)
    banks = np.maximum(f32(0), np.minimum(up, down))
    return np.pad(banks, ((0, 0), (0, 1)))


def num_frames(num_samples: int) -> int:
    """Frames of a waveform with Kaldi's snip_edges: only whole 25 ms windows."""
    return 0 if num_samples < FRAME_LENGTH else 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT


def _frame_indices(num_samples: int) -> np.ndarray:
    starts = FRAME_SHIFT * np.arange(num_frames(num_samples))
    return starts[:, None] + np.arange(FRAME_LENGTH)[None, :]


def _window() -> np.ndarray:
    """Symmetric Hann window of 400 samples: 0.5 - 0.5 cos(2 pi n / 399)."""
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(FRAME_LENGTH) / (FRAME_LENGTH - 1))


def _log_mel(xp, waveform, num_mel_bins: int):
    """Shared NumPy / JAX body: mean removal, framing, DC removal, pre-emphasis (x[-1] := x[0]),
    window, power spectrum, mel energies, log floored at float32 eps."""
    waveform = waveform - waveform.mean()
    frames = waveform[_frame_indices(waveform.shape[0])]
    frames = frames - frames.mean(axis=1, keepdims=True)
    previous = xp.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = (frames - PREEMPHASIS * previous) * xp.asarray(_window(), frames.dtype)
    power = xp.abs(xp.fft.rfft(frames, n=FFT_SIZE)) ** 2
    energies = power @ xp.asarray(mel_banks(num_mel_bins).T, power.dtype)
    return xp.log(xp.maximum(energies, LOG_FLOOR))


def pad_or_crop(fbank, target_length: int):
    """Zero rows appended at the end, or the first ``target_length`` frames kept."""
    if fbank.shape[0] >= target_length:
        return fbank[:target_length]
    pad = [(0, target_length - fbank.shape[0]), (0, 0)]
    return np.pad(fbank, pad) if isinstance(fbank, np.ndarray) else _jnp().pad(fbank, pad)


def _jnp():
    import jax.numpy as jnp

    return jnp


def compute_fbank(
    waveform: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    num_mel_bins: int = 128,
    target_length: int = 1024,
) -> np.ndarray:
    """The official loader's fbank: waveform mean removed, Kaldi fbank, padded / cropped.
    Returns float32 [target_length, num_mel_bins], not normalised. Computed in float64."""
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"the fbank is defined at {SAMPLE_RATE} Hz, got {sample_rate} Hz")
    if len(waveform) < FRAME_LENGTH:
        raise ValueError(f"a waveform of {len(waveform)} samples is shorter than one 25 ms frame")
    waveform = np.asarray(waveform, np.float32).astype(np.float64)
    fbank = _log_mel(np, waveform, num_mel_bins).astype(np.float32)
    return pad_or_crop(fbank, target_length)


def mixed_fbank(
    first: np.ndarray, second: np.ndarray, lam: float, target_length: int = 1024
) -> np.ndarray:
    """The official mixup fbank: both waveforms de-meaned, the second zero-padded or cut to the
    first's length, ``lam * first + (1 - lam) * second`` de-meaned again, then ``compute_fbank``."""
    first = np.asarray(first, np.float32)
    second = np.asarray(second, np.float32)
    first = first - first.mean()
    second = second - second.mean()
    partner = np.zeros_like(first)
    partner[: min(len(first), len(second))] = second[: len(first)]
    mix = (lam * first + (1 - lam) * partner).astype(np.float32)
    return compute_fbank(mix, target_length=target_length)


def normalize_fbank(
    fbank: np.ndarray, mean: float = DATASET_MEAN, std: float = DATASET_STD
) -> np.ndarray:
    """(fbank - mean) / std: with the defaults (fbank + 5.081) / 4.4849, as the official loader."""
    return ((fbank - mean) / std).astype(np.float32)


def jax_fbank(waveform, num_mel_bins: int = 128, target_length: int = 1024):
    """``compute_fbank`` in JAX, float32 (jit-able; the waveform length is static)."""
    jnp = _jnp()
    fbank = _log_mel(jnp, jnp.asarray(waveform, jnp.float32), num_mel_bins)
    return pad_or_crop(fbank, target_length)
