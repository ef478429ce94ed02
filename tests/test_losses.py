"""Losses against independent NumPy references (official behaviours 9-11)."""

from __future__ import annotations

import numpy as np
import pytest

from cavmae_jax import losses


def np_mae(pred, target, mask, norm_pix):
    pred, target = pred.astype(np.float64), target.astype(np.float64)
    if norm_pix:
        n = target.shape[-1]
        mean = target.sum(-1, keepdims=True) / n
        var = ((target - mean) ** 2).sum(-1, keepdims=True) / (n - 1)
        target = (target - mean) / np.sqrt(var + 1e-6)
    per = ((pred - target) ** 2).mean(-1)
    return (per * mask).sum() / mask.sum()


def np_nce(a, v, bidirectional=False):
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    s = (a.astype(np.float64) @ v.T.astype(np.float64)) / 0.05

    def one(sim):
        losses, hits = [], []
        for j in range(sim.shape[1]):
            col = sim[:, j]
            logz = np.log(np.exp(col - col.max()).sum()) + col.max()
            losses.append(logz - col[j])
            hits.append(np.argmax(col) == j)
        return np.mean(losses), np.mean(hits)

    loss, acc = one(s)
    if bidirectional:
        loss2, acc2 = one(s.T)
        return (loss + loss2) / 2, (acc + acc2) / 2
    return loss, acc


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_matches_numpy(norm_pix):
    rng = np.random.default_rng(0)
    pred = rng.standard_normal((3, 10, 16)).astype(np.float32)
    target = (5 + 3 * rng.standard_normal((3, 10, 16))).astype(np.float32)
    mask = (rng.random((3, 10)) < 0.7).astype(np.float32)
    got = float(losses.mae_loss(pred, target, mask, norm_pix))
    assert got == pytest.approx(np_mae(pred, target, mask, norm_pix), rel=1e-5)


def test_norm_pix_uses_the_unbiased_variance():
    target = np.array([[[0.0, 2.0]]], np.float32)  # mean 1; unbiased var 2, biased var 1
    pred = np.zeros((1, 1, 2), np.float32)
    got = float(losses.mae_loss(pred, target, np.ones((1, 1)), True))
    assert got == pytest.approx(1 / (2 + 1e-6), rel=1e-6)


def test_mae_loss_averages_only_removed_patches():
    pred = np.zeros((1, 2, 1), np.float32)
    target = np.array([[[1.0], [100.0]]], np.float32)
    assert float(losses.mae_loss(pred, target, np.array([[1.0, 0.0]]), False)) == 1.0


@pytest.mark.parametrize("bidirectional", [False, True])
def test_contrastive_loss_matches_numpy(bidirectional):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((8, 6)).astype(np.float32)
    v = (a + 0.8 * rng.standard_normal((8, 6))).astype(np.float32)
    loss, acc = losses.contrastive_loss(a, v, bidirectional)
    ref_loss, ref_acc = np_nce(a, v, bidirectional)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
    assert float(acc) == pytest.approx(ref_acc)


def test_single_direction_softmax_runs_over_audios():
    """Each video column classifies the audios: a duplicated audio row halves that column."""
    a = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)  # two identical audios
    v = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    loss, _ = losses.contrastive_loss(a, v)
    ref_loss, _ = np_nce(a, v)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
    assert float(loss) == pytest.approx(np.log(2) / 2 + np.log(2) / 2, rel=1e-5)


def test_grouped_loss_is_sum_of_group_losses():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((12, 5)).astype(np.float32)
    v = rng.standard_normal((12, 5)).astype(np.float32)
    loss, acc = losses.grouped_contrastive_loss(a, v, 4)
    parts = [np_nce(a[i : i + 3], v[i : i + 3]) for i in range(0, 12, 3)]
    assert float(loss) == pytest.approx(sum(p[0] for p in parts), rel=1e-5)
    assert float(acc) == pytest.approx(np.mean([p[1] for p in parts]))
    with pytest.raises(ValueError, match="does not split"):
        losses.grouped_contrastive_loss(a, v, 5)


def test_classification_losses_match_numpy_and_torch():
    import torch

    rng = np.random.default_rng(3)
    logits = rng.standard_normal((6, 5)).astype(np.float32) * 4
    targets = rng.random((6, 5)).astype(np.float32) * 0.9  # soft, not normalised
    sigmoid = 1 / (1 + np.exp(-logits.astype(np.float64)))
    bce = -np.mean(targets * np.log(sigmoid) + (1 - targets) * np.log(1 - sigmoid))
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted.astype(np.float64)).sum(axis=1, keepdims=True))
    ce = -np.mean(np.sum(targets * log_softmax, axis=1))
    assert float(losses.binary_cross_entropy(logits, targets)) == pytest.approx(bce, rel=1e-5)
    assert float(losses.soft_cross_entropy(logits, targets)) == pytest.approx(ce, rel=1e-5)
    t_logits, t_targets = torch.from_numpy(logits), torch.from_numpy(targets)
    assert float(torch.nn.BCEWithLogitsLoss()(t_logits, t_targets)) == pytest.approx(bce, rel=1e-5)
    assert float(torch.nn.CrossEntropyLoss()(t_logits, t_targets)) == pytest.approx(ce, rel=1e-5)


def np_proto_nce(similarity, gamma, targets, valid):
    out = []
    for s, t in zip(similarity, targets, strict=True):
        logits = [s[k] / gamma[k] for k in range(len(s)) if valid[k]]
        positive = s[t] / gamma[t]
        out.append(np.log(np.sum(np.exp(np.array(logits, np.float64)))) - positive)
    return np.mean(out)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_prototype_losses_match_numpy():
    rng = np.random.default_rng(5)
    b, g, k, d = 6, 2, 5, 8
    za, ha, hv = rng.standard_normal((3, b, d))
    pa, pv = unit(rng.standard_normal((2, g, k, d)))
    gamma = rng.uniform(0.05, 0.3, (g, k))
    valid = np.ones((g, k), bool)
    valid[1, 4] = False  # granularity 1 has 4 prototypes
    targets = rng.integers(0, 4, (g, b))
    tau = 0.1
    pje = (
        np.mean(
            [np_proto_nce(unit(za) @ pv[i].T, gamma[i], targets[i], valid[i]) for i in range(g)]
        )
        / tau
    )
    got = losses.pje_loss(za, pv, gamma, targets, valid, tau)
    assert float(got) == pytest.approx(pje, rel=1e-5)
    pcpe = (
        np.mean(
            [
                np_proto_nce(
                    unit(ha) @ pa[i].T + unit(hv) @ pv[i].T, gamma[i], targets[i], valid[i]
                )
                for i in range(g)
            ]
        )
        / tau
    )
    got = losses.pcpe_loss(ha, hv, pa, pv, gamma, targets, valid, tau)
    assert float(got) == pytest.approx(pcpe, rel=1e-5)
