"""Fixed 2-D sine-cosine position tables, exactly as the official ``get_2d_sincos_pos_embed``."""

from __future__ import annotations

import numpy as np


def sincos_2d(dim: int, rows: int, cols: int) -> np.ndarray:
    """Position table [rows*cols, dim] float32 for a row-major grid (token n = row*cols + col).

    Channels [0, D/4) sin(col*w), [D/4, D/2) cos(col*w), [D/2, 3D/4) sin(row*w), [3D/4, D)
    cos(row*w), with w_k = 10000^(-k/(D/4)): the first half encodes the column (official
    behaviour 4).
    Frequencies and products in float64, cast to float32 once at the end.
    """
    if dim % 4:
        raise ValueError(f"position table width must be a multiple of 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    row, col = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = pos.reshape(-1).astype(np.float32).astype(np.float64)[:, None] * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(col), encode(row)], axis=1).astype(np.float32)


def fit_table(table, grid: tuple[int, int], new_grid: tuple[int, int], how: str):
    """A position table [1, rows*cols, D] of ``grid`` for another grid: ``trim`` keeps the first
    rows and columns (the tokens a shorter input has: the first time patches of a shorter
    clip); ``interpolate`` resamples the grid linearly (half-pixel centres, no antialiasing:
    PyTorch's bilinear ``align_corners=False``)."""
    import jax
    import jax.numpy as jnp

    (rows, cols), (new_rows, new_cols) = grid, new_grid
    dim = table.shape[-1]
    image = jnp.reshape(table, (rows, cols, dim))
    if how == "trim":
        if new_rows > rows or new_cols > cols:
            raise ValueError(f"cannot trim a {rows}x{cols} grid to {new_rows}x{new_cols}")
        image = image[:new_rows, :new_cols]
    elif how == "interpolate":
        image = jax.image.resize(
            image.astype(jnp.float32), (new_rows, new_cols, dim), "linear", antialias=False
        ).astype(table.dtype)
    else:
        raise ValueError(f"unknown position-table fit {how!r}; expected trim or interpolate")
    return jnp.reshape(image, (1, new_rows * new_cols, dim))
