"""Masking: kept counts, explicit-noise reproduction of the official argsort, structured modes."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from cavmae_jax.models import masking


@pytest.mark.parametrize(
    "length,ratio,kept",
    [
        (512, 0.75, 128),
        (196, 0.75, 49),
        (512, 0.5, 256),
        (196, 0.5, 98),
        (512, 0.65, 179),
        (196, 0.65, 68),
        (512, 0.85, 76),
        (196, 0.85, 29),
    ],
)
def test_kept_count_truncates_like_the_official(length, ratio, kept):
    assert masking.num_kept(length, ratio) == kept


def test_explicit_noise_keeps_smallest_noise_in_noise_order():
    rng = np.random.default_rng(0)
    noise = rng.random((3, 20)).astype(np.float32)
    tokens = np.arange(3 * 20 * 2, dtype=np.float32).reshape(3, 20, 2)
    out = masking.apply_mask(tokens, noise, 0.75)
    ids_keep = np.argsort(noise, axis=1)[:, :5]
    np.testing.assert_array_equal(
        np.asarray(out.kept), np.take_along_axis(tokens, ids_keep[..., None], 1)
    )
    expected_mask = np.ones((3, 20))
    np.put_along_axis(expected_mask, ids_keep, 0, axis=1)
    np.testing.assert_array_equal(np.asarray(out.mask), expected_mask)
    np.testing.assert_array_equal(np.asarray(out.ids_restore), np.argsort(np.argsort(noise, 1), 1))


def test_restore_order_puts_kept_tokens_back_in_place():
    from cavmae_jax.models.cav_mae import restore_order

    noise = np.random.default_rng(1).random((2, 10)).astype(np.float32)
    tokens = np.random.default_rng(2).standard_normal((2, 10, 3)).astype(np.float32)
    out = masking.apply_mask(tokens, noise, 0.6)
    restored = np.asarray(restore_order(out.kept, out.ids_restore, np.full((1, 1, 3), 7.0)))
    kept = np.asarray(out.mask) == 0
    np.testing.assert_array_equal(restored[kept], tokens[kept])
    assert np.all(restored[~kept] == 7.0)


@pytest.mark.parametrize("mode", masking.MASK_MODES)
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_every_mode_removes_the_fixed_count(mode, ratio):
    noise = masking.audio_noise(jax.random.key(0), 6, (8, 64), ratio, mode)
    tokens = np.zeros((6, 512, 1), np.float32)
    mask = np.asarray(masking.apply_mask(tokens, noise, ratio).mask)
    assert mask.shape == (6, 512)
    assert np.all(mask.sum(1) == 512 - masking.num_kept(512, ratio))
    assert set(np.unique(mask)) <= {0.0, 1.0}


@pytest.mark.parametrize(
    "mode,ratio,cols,rows",
    [
        ("time", 0.75, 48, 0),
        ("freq", 0.75, 0, 6),
        ("tf", 0.75, 33, 4),
        ("tf", 0.5, 22, 2),
        ("unstructured", 0.75, 0, 0),
    ],
)
def test_structured_noise_forces_whole_lines(mode, ratio, cols, rows):
    noise = np.asarray(masking.audio_noise(jax.random.key(1), 4, (8, 64), ratio, mode))
    grid = noise.reshape(4, 8, 64) == masking.FORCED_NOISE
    assert np.all(grid.all(axis=1).sum(1) == cols)  # fully forced time columns
    assert np.all(grid.all(axis=2).sum(1) == rows)  # fully forced frequency rows
    assert np.all((noise < 1.0) | (noise == masking.FORCED_NOISE))


def test_time_mask_removes_whole_time_columns():
    ratio = 0.75
    noise = masking.audio_noise(jax.random.key(2), 2, (8, 64), ratio, "time")
    mask = np.asarray(masking.apply_mask(np.zeros((2, 512, 1)), noise, ratio).mask)
    columns = mask.reshape(2, 8, 64)
    assert np.all(columns.min(1) == columns.max(1))  # each column all kept or all removed
    assert np.all(columns[:, 0].sum(1) == 48)


def test_tf_mode_keeps_some_forced_tokens_when_more_are_forced_than_removed():
    noise = np.asarray(masking.audio_noise(jax.random.key(3), 2, (8, 64), 0.75, "tf"))
    assert np.all((noise == masking.FORCED_NOISE).sum(1) == 388)
    mask = np.asarray(masking.apply_mask(np.zeros((2, 512, 1)), noise, 0.75).mask)
    assert np.all(((noise == masking.FORCED_NOISE) & (mask == 0)).sum(1) == 4)


def test_masks_differ_between_examples_and_keys():
    a = np.asarray(masking.audio_noise(jax.random.key(0), 2, (8, 64), 0.75, "time"))
    b = np.asarray(masking.audio_noise(jax.random.key(1), 2, (8, 64), 0.75, "time"))
    assert not np.array_equal(a[0] == 1.1, a[1] == 1.1)
    assert not np.array_equal(a == 1.1, b == 1.1)


def test_bad_mode_and_bad_noise_shape_are_reported():
    with pytest.raises(ValueError, match="unknown mask mode"):
        masking.audio_noise(jax.random.key(0), 1, (8, 64), 0.75, "diagonal")
    with pytest.raises(ValueError, match="noise shape"):
        masking.apply_mask(np.zeros((1, 10, 2)), np.zeros((1, 9)), 0.5)
