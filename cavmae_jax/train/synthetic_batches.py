"""Randomly generated audio-visual batches with a learnable correspondence (demo until real data).

Each clip draws two hidden factors in [0, 1): the first sets the mel position of a loud band in
its spectrogram and the hue of its image, the second the band's on/off rate in time and the
image's left-right brightness slope. Audio and image share nothing else, so matching them
(``c_acc``) must be learnt from the correspondence.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def _hue_rgb(hue: np.ndarray) -> np.ndarray:
    """[B] hue in [0, 1) -> [B, 3] colour on the unit colour wheel, roughly in [-1.5, 1.5]."""
    angles = 2 * np.pi * (hue[:, None] + np.array([0.0, 1 / 3, 2 / 3]))
    return 1.5 * np.cos(angles)


def random_av_batches(
    batch_size: int, audio_length: int, num_mel_bins: int, img_size: int, classes: int, seed: int
) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches: ``audio`` [B, T, F], ``image`` [B, H, W, 3], ``label`` [B, classes]
    (the class is the first factor quantised to ``classes`` bins)."""
    rng = np.random.default_rng(seed)
    mel = np.arange(num_mel_bins)
    frames = np.arange(audio_length)
    columns = np.linspace(-1, 1, img_size)
    while True:
        first, second = rng.random(batch_size), rng.random(batch_size)
        centre = first[:, None] * (num_mel_bins - 1)
        band = np.exp(-0.5 * ((mel[None] - centre) / 1.5) ** 2)  # [B, F]
        rate = 2 + 10 * second[:, None]  # on/off cycles per clip
        gate = (np.sin(2 * np.pi * rate * frames[None] / audio_length) > 0).astype(float)  # [B, T]
        audio = 3 * gate[:, :, None] * band[:, None, :]
        audio = audio + rng.standard_normal(audio.shape)
        slope = (2 * second - 1)[:, None, None] * columns[None, None, :]  # [B, 1, W]
        image = _hue_rgb(first)[:, None, None, :] + slope[..., None]
        image = image + 0.5 * rng.standard_normal((batch_size, img_size, img_size, 3))
        label = np.minimum((first * classes).astype(int), classes - 1)
        yield {
            "audio": audio.astype(np.float32),
            "image": image.astype(np.float32),
            "label": np.eye(classes, dtype=np.float32)[label],
        }
