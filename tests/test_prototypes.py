"""Prototype discovery: true centres of Gaussian mixtures, chunking, eq. (2) against NumPy."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from cavmae_jax import prototypes
from cavmae_jax.errors import UserError


def mixture(seed=0, components=5, per=60, dim=8, spread=0.1):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((components, dim)) * 2.0
    labels = np.repeat(np.arange(components), per)
    points = centres[labels] + spread * rng.standard_normal((len(labels), dim))
    return points.astype(np.float32), centres, labels


def nearest_centre_distances(found, centres):
    d = np.linalg.norm(found[:, None] - centres[None], axis=2)
    return d.argmin(axis=1), d.min(axis=1)


def test_density_peaks_are_real_clips_at_the_true_centres():
    points, centres, truth = mixture()
    valid = np.ones(len(points), bool)
    peaks = prototypes.density_peaks(points, valid, neighbours=40, chunk=64)
    which, dist = nearest_centre_distances(points[peaks], centres)
    assert sorted(which) == list(range(len(centres)))  # one prototype per component
    # a typical member lies 0.1 x sqrt(8) = 0.28 from its centre; each peak is among the 10 most
    # central of its component's 60 samples
    for peak, component in zip(peaks, which, strict=True):
        members = np.nonzero(truth == component)[0]
        radius = np.linalg.norm(points[members] - centres[component], axis=1)
        assert np.sum(radius < np.linalg.norm(points[peak] - centres[component])) < 10
    assert dist.max() < 0.2
    labels = np.asarray(prototypes.assign(points, points[peaks], chunk=64))
    assert all(len(set(labels[truth == c])) == 1 for c in range(len(centres)))


def test_kmeans_recovers_the_centres_deterministically():
    points, centres, _ = mixture(seed=1)
    bank = prototypes.whole_bank(points, points)
    found = np.asarray(prototypes.kmeans(bank, points, 5, seed=3, chunk=64))
    which, dist = nearest_centre_distances(found, centres)
    assert sorted(which) == list(range(5)) and dist.max() < 0.05
    again = prototypes.kmeans(bank, points, 5, seed=3)
    np.testing.assert_array_equal(found, np.asarray(again))


def test_chunked_passes_equal_brute_force():
    rng = np.random.default_rng(2)
    bank = rng.standard_normal((50, 6)).astype(np.float32)
    d2 = ((bank[:, None] - bank[None]) ** 2).sum(-1)
    density = np.exp(-d2 / (2 * 0.7**2)).sum(1)
    valid = np.ones(len(bank), bool)
    np.testing.assert_allclose(
        prototypes.kernel_density(bank, valid, 0.7, chunk=7), density, rtol=1e-4
    )
    near = np.asarray(prototypes.nearest_neighbours(bank, valid, 4, chunk=7))
    np.testing.assert_array_equal(np.sort(near, 1), np.sort(np.argsort(d2, 1)[:, :4], 1))
    centres = bank[:3]
    np.testing.assert_array_equal(prototypes.assign(bank, centres, chunk=7), d2[:, :3].argmin(1))


def test_concentration_follows_equation_2():
    rng = np.random.default_rng(3)
    audio, visual = rng.standard_normal((2, 20, 4))
    labels = np.r_[np.zeros(12, int), np.ones(7, int), [2]]  # prototype 2 has one member
    pa, pv = rng.standard_normal((2, 3, 4))
    got = np.asarray(prototypes.concentration(audio, visual, pa, pv, labels, beta=10.0))
    expected = []
    for k in range(2):
        members = labels == k
        n = members.sum()
        num = np.linalg.norm(visual[members] - pv[k], axis=1).sum() * n
        num += np.linalg.norm(audio[members] - pa[k], axis=1).sum() * n  # the I x J double sum
        expected.append(num / (n * n * np.log(n + n + 10.0)))
    np.testing.assert_allclose(got[:2], expected, rtol=1e-5)
    assert got[2] == pytest.approx(max(expected), rel=1e-6)


def test_a_cap_on_the_prototypes_is_said_and_an_impossible_k_refused(capsys):
    points, _, _ = mixture(seed=4)
    unit = points / np.linalg.norm(points, axis=1, keepdims=True)
    bank = prototypes.whole_bank(unit, unit)
    settings = ml_collections.ConfigDict(
        dict(method="density", granularities=(40,), max_prototypes=3, beta=10.0, tau=0.1)
    )
    settings.scale = "paper"
    arrays, (level,) = prototypes.from_settings(bank, settings, seed=0)
    assert level["found"] == 5 and len(level["sizes"]) == 3 and arrays["valid"].sum() == 3
    assert (
        "neighbourhood 40 found 5 density peaks; the 3 densest are kept" in capsys.readouterr().out
    )
    settings.update(method="kmeans", granularities=(3,))
    prototypes.from_settings(bank, settings, seed=0)
    assert capsys.readouterr().out == ""
    settings.granularities = (4,)
    with pytest.raises(UserError, match="k = 4 above pcav.max_prototypes = 3"):
        prototypes.from_settings(bank, settings, seed=0)
