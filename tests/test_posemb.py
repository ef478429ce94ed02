"""Fixed sin-cos position tables against an independent evaluation of the formula (behaviour 4)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cavmae_jax.models.posemb import sincos_2d


def formula(dim: int, rows: int, cols: int) -> np.ndarray:
    """Element by element: channel c of token n = r*cols + w, in float64."""
    q = dim // 4
    out = np.zeros((rows * cols, dim))
    for r in range(rows):
        for w in range(cols):
            for k in range(q):
                omega = 1.0 / 10000 ** (k / q)
                out[r * cols + w, k] = math.sin(w * omega)
                out[r * cols + w, q + k] = math.cos(w * omega)
                out[r * cols + w, 2 * q + k] = math.sin(r * omega)
                out[r * cols + w, 3 * q + k] = math.cos(r * omega)
    return out.astype(np.float32)


@pytest.mark.parametrize("dim,rows,cols", [(16, 8, 64), (32, 14, 14), (8, 3, 5)])
def test_table_equals_formula(dim, rows, cols):
    np.testing.assert_allclose(sincos_2d(dim, rows, cols), formula(dim, rows, cols), atol=1e-6)


def test_audio_table_reference_values():
    table = sincos_2d(768, 8, 64)
    assert table.shape == (512, 768) and table.dtype == np.float32
    expected = [0.84147096, 0.81525064, 0.78859305]
    np.testing.assert_allclose(table[1, 0:3], expected, rtol=1e-7)  # time 1, freq 0
    np.testing.assert_allclose(table[64, 384:387], expected, rtol=1e-7)  # freq 1, time 0


def test_first_half_encodes_columns():
    table = sincos_2d(8, 2, 3)
    assert np.array_equal(table[0, :4], table[3, :4])  # same column, different row
    assert not np.array_equal(table[0, 4:], table[3, 4:])


def test_rejects_width_not_multiple_of_four():
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_2d(10, 2, 2)
