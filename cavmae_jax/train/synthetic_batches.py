"""Randomly generated audio-visual batches with a learnable correspondence (demo until real data).

Each clip has a class c: its spectrogram carries a band at mel rows tied to c and its image a
colour tied to c, both under noise, so a model can learn to match audio and image.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def random_av_batches(
    batch_size: int, audio_length: int, num_mel_bins: int, img_size: int, classes: int, seed: int
) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches: ``audio`` [B, T, F], ``image`` [B, H, W, 3], ``label`` [B, classes]."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(-1.5, 1.5, (classes, 3)).astype(np.float32)
    band = num_mel_bins // classes
    while True:
        label = rng.integers(0, classes, batch_size)
        audio = rng.standard_normal((batch_size, audio_length, num_mel_bins)).astype(np.float32)
        image = rng.standard_normal((batch_size, img_size, img_size, 3)).astype(np.float32)
        for i, c in enumerate(label):
            audio[i, :, c * band : (c + 1) * band] += 3.0
            image[i] += colours[c]
        yield {"audio": audio, "image": image, "label": np.eye(classes, dtype=np.float32)[label]}
