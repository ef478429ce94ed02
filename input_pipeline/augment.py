"""Per-clip training augmentations of the official loader, in TensorFlow with stateless seeds.

Every random draw takes an explicit ``seed`` (a [2] int tensor), so a clip's augmentation depends
only on (run seed, epoch, position): the stream is reproducible and resumable.
"""

from __future__ import annotations

import tensorflow as tf

MIXUP_ALPHA = 10.0  # lambda ~ Beta(10, 10)
LOG_FLOOR = 1.1920929e-07


def sub_seed(seed: tf.Tensor, k: int) -> tf.Tensor:
    """An independent stateless seed for the k-th draw of one clip."""
    return tf.random.experimental.stateless_fold_in(seed, k)


def uniform(seed: tf.Tensor, shape=()) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, seed=seed, dtype=tf.float32)


def mask_along_axis(fbank: tf.Tensor, param: int, axis: int, seed: tf.Tensor) -> tf.Tensor:
    """torchaudio ``FrequencyMasking`` / ``TimeMasking`` (one mask, value 0): width
    ``w = U * param``, start ``floor(U' * (size - w))``, masked ``[start, start + floor(w))``."""
    size = tf.shape(fbank)[axis]
    width = uniform(sub_seed(seed, 0)) * param
    start = tf.floor(uniform(sub_seed(seed, 1)) * (tf.cast(size, tf.float32) - width))
    start = tf.cast(start, tf.int32)
    end = start + tf.cast(tf.floor(width), tf.int32)
    index = tf.range(size)
    keep = tf.logical_or(index < start, index >= end)
    shape = [1, 1]
    shape[axis] = -1
    return fbank * tf.cast(tf.reshape(keep, shape), fbank.dtype)


def spec_augment(fbank: tf.Tensor, freqm: int, timem: int, seed: tf.Tensor) -> tf.Tensor:
    """Frequency mask then time mask on a [time, freq] fbank (before normalisation)."""
    if freqm:
        fbank = mask_along_axis(fbank, freqm, 1, sub_seed(seed, 0))
    if timem:
        fbank = mask_along_axis(fbank, timem, 0, sub_seed(seed, 1))
    return fbank


def mixup_lambda(seed: tf.Tensor) -> tf.Tensor:
    """lambda ~ Beta(10, 10) from two stateless Gamma draws."""
    x = tf.random.stateless_gamma((), sub_seed(seed, 0), alpha=MIXUP_ALPHA)
    y = tf.random.stateless_gamma((), sub_seed(seed, 1), alpha=MIXUP_ALPHA)
    return x / (x + y)


def mix_fbanks(fb1, frames1, fb2, frames2, lam) -> tf.Tensor:
    """Fbank-domain stand-in for the official waveform mixup (used when no waveform is stored).

    Mixing waveforms ``lam w1 + (1 - lam) w2`` gives mel energies ``lam^2 E1 + (1 - lam)^2 E2``
    plus a cross term of zero mean; this returns the log of that expectation over clip 1's
    frames (clip 2 counts as silence past its own length, as the official zero padding), with
    clip 1's padding rows left at 0.
    """
    rows = tf.range(tf.shape(fb1)[0])[:, None]
    energy2 = tf.where(rows < frames2, tf.exp(fb2), 0.0)
    mixed = tf.math.log(tf.maximum(lam**2 * tf.exp(fb1) + (1 - lam) ** 2 * energy2, LOG_FLOOR))
    return tf.where(rows < frames1, mixed, 0.0)


def labels(label1, label2, lam, num_classes: int, smoothing: float) -> tf.Tensor:
    """Official targets: eps/K everywhere; without mixup (lam = 1, no partner) positives are set
    to 1 - eps; with mixup lam (1 - eps) and (1 - lam)(1 - eps) are added at each clip's labels."""
    floor = tf.fill([num_classes], smoothing / num_classes)
    hot1 = tf.reduce_max(tf.one_hot(label1, num_classes), axis=0)
    if label2 is None:
        return tf.where(hot1 > 0, 1.0 - smoothing, floor)
    hot2 = tf.reduce_max(tf.one_hot(label2, num_classes), axis=0)
    return floor + lam * (1 - smoothing) * hot1 + (1 - lam) * (1 - smoothing) * hot2


def noise_and_roll(fbank: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Official noise augmentation on the normalised fbank: + U[0,1) * U[0,1) / 10, then a
    circular shift along time by an integer in [-T, T)."""
    size = tf.shape(fbank)[0]
    scale = uniform(sub_seed(seed, 0)) / 10
    fbank = fbank + uniform(sub_seed(seed, 1), tf.shape(fbank)) * scale
    shift = tf.random.stateless_uniform(
        (), sub_seed(seed, 2), minval=-size, maxval=size, dtype=tf.int32
    )
    return tf.roll(fbank, shift, axis=0)
