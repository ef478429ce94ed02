"""Random token masking with a fixed kept-token count, reproducible from explicit noise.

A mask is driven by a noise array [B, L]: tokens are ranked by ascending noise and the
``int(L * (1 - ratio))`` smallest are kept, as the official ``argsort`` masking. Structured audio
masks (``time``, ``freq``, ``tf``) force whole time columns / frequency rows to noise 1.1 first.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

MASK_MODES = ("unstructured", "time", "freq", "tf")
FORCED_NOISE = 1.1  # larger than any uniform draw: forced tokens are removed first


class Masking(NamedTuple):
    """Result of masking a token sequence.

    kept: [B, K, D] kept tokens in ascending-noise order; mask: [B, L] float, 1 = removed;
    ids_restore: [B, L] int, position of each token in the noise-sorted order.
    """

    kept: jax.Array
    mask: jax.Array
    ids_restore: jax.Array


def num_kept(length: int, ratio: float) -> int:
    """Kept-token count with the official truncation: ``int(L * (1 - r))``."""
    return int(length * (1 - ratio))


def apply_mask(tokens: jax.Array, noise: jax.Array, ratio: float) -> Masking:
    """Keep the ``num_kept`` tokens of smallest noise. tokens [B, L, D], noise [B, L]."""
    length = tokens.shape[1]
    if noise.shape != tokens.shape[:2]:
        raise ValueError(f"noise shape {noise.shape} does not match tokens {tokens.shape[:2]}")
    keep = num_kept(length, ratio)
    with jax.named_scope("masking"):
        ids_shuffle = jnp.argsort(noise, axis=1, stable=True)
        ids_restore = jnp.argsort(ids_shuffle, axis=1, stable=True)
        kept = jnp.take_along_axis(tokens, ids_shuffle[:, :keep, None], axis=1)
        mask = (ids_restore >= keep).astype(jnp.float32)
    return Masking(kept, mask, ids_restore)


def _forced_lines(key: jax.Array, batch: int, lines: int, count: int) -> jax.Array:
    """[B, lines] bool: ``count`` distinct lines per example, chosen uniformly."""
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(key, (batch, lines)), axis=1), axis=1)
    return ranks < count


def audio_noise(
    key: jax.Array, batch: int, grid: tuple[int, int], ratio: float, mode: str = "unstructured"
) -> jax.Array:
    """Masking noise [B, F*T] for the audio grid (F frequency rows, T time columns).

    ``time`` forces ``int(T*r)`` columns, ``freq`` ``int(F*r)`` rows, ``tf`` ``int(T*r*0.7)``
    columns and ``int(F*r*0.7)`` rows (official counts). In ``tf`` mode more tokens can be forced
    than removed; the survivors among forced tokens are then the lowest token indices (stable
    ranking), where the official non-stable argsort picks arbitrarily.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"unknown mask mode {mode!r}; expected one of {MASK_MODES}")
    rows, cols = grid
    key_noise, key_cols, key_rows = jax.random.split(key, 3)
    noise = jax.random.uniform(key_noise, (batch, rows, cols))
    forced = jnp.zeros((batch, rows, cols), bool)
    scale = 0.7 if mode == "tf" else 1.0
    if mode in ("time", "tf"):
        chosen = _forced_lines(key_cols, batch, cols, int(cols * ratio * scale))
        forced |= chosen[:, None, :]
    if mode in ("freq", "tf"):
        chosen = _forced_lines(key_rows, batch, rows, int(rows * ratio * scale))
        forced |= chosen[:, :, None]
    return jnp.where(forced, FORCED_NOISE, noise).reshape(batch, rows * cols)
