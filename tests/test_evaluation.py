"""Statistics against scikit-learn, retrieval against the official sort-and-search loop."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

from cavmae_jax import evaluation, retrieval


def random_task(seed=0, n=60, k=6):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, k)) < 0.3).astype(np.float32)
    scores = targets * 0.8 + rng.standard_normal((n, k))
    scores[:10, 0] = np.round(scores[:10, 0])  # ties
    scores = np.round(scores, 1)  # many ties everywhere
    return scores, targets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_ap_and_auc_equal_scikit_learn(seed):
    scores, targets = random_task(seed)
    stats = evaluation.classification_stats(scores, targets)
    for k in range(scores.shape[1]):
        assert stats["AP"][k] == pytest.approx(average_precision_score(targets[:, k], scores[:, k]))
        assert stats["AUC"][k] == pytest.approx(roc_auc_score(targets[:, k], scores[:, k]))
    assert stats["mAP"] == pytest.approx(np.mean(stats["AP"]))
    assert stats["d_prime"] == pytest.approx(np.sqrt(2) * norm.ppf(np.mean(stats["AUC"])))
    assert stats["acc"] == pytest.approx(
        accuracy_score(np.argmax(targets, 1), np.argmax(scores, 1))
    )


def test_class_without_positives_has_auc_minus_one_in_the_mean():
    scores, targets = random_task()
    targets[:, 2] = 0
    stats = evaluation.classification_stats(scores, targets)
    assert stats["AUC"][2] == -1.0
    assert stats["mAUC"] == pytest.approx(np.mean(stats["AUC"]))
    with pytest.warns(UserWarning):
        assert stats["AP"][2] == average_precision_score(targets[:, 2], scores[:, 2])


def brute_force_ranks(q, c):
    """The official retrieval: sort each query's similarities, find the true pair's position."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    c = c / np.linalg.norm(c, axis=1, keepdims=True)
    ranks = []
    for i in range(len(q)):
        sims = [float(q[i] @ c[j]) for j in range(len(c))]
        ranks.append(sum(s > sims[i] for s in sims))
    return np.array(ranks)


def brute_force_recall(a, v):
    out = {}
    for name, (q, c) in {"a2v": (a, v), "v2a": (v, a)}.items():
        ranks = brute_force_ranks(q, c)
        out.update({f"{name}_r{k}": np.mean(ranks < k) for k in (1, 5, 10)})
        out[f"{name}_mr"] = np.median(ranks) + 1
    return out


@pytest.mark.parametrize("block", [7, 512])
def test_blocked_retrieval_equals_brute_force(block):
    """Blocks of 7 queries (the last one short) and one padded block; clips 30..39 repeat clips
    0..9 exactly, so tied candidates must not count against the true partner."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 8)).astype(np.float32)
    v = a + 1.2 * rng.standard_normal((40, 8)).astype(np.float32)
    a[30:], v[30:] = a[:10], v[:10]
    ours = retrieval.recall(a, v, block=block)
    for name, value in brute_force_recall(a, v).items():
        assert ours[name] == pytest.approx(value), name
    assert ours["a2v_r1"] > 1 / 40


def test_an_all_zero_embedding_ranks_last_and_leaves_recall_finite():
    """Visual clip 3 all zero (a silent or blank clip through a frozen stream): as a candidate
    it outranks nobody, so every other clip's rank is the brute force's over the other clips;
    as a query, and as the partner of audio query 3, it is ranked last."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((12, 8)).astype(np.float32)
    v = a + 0.8 * rng.standard_normal((12, 8)).astype(np.float32)
    v[3] = 0.0
    for queries, candidates in ((a, v), (v, a)):
        ranks = retrieval.partner_ranks(queries, candidates, block=5)
        assert ranks[3] == len(a) - 1
        keep = np.arange(len(a)) != 3
        expected = brute_force_ranks(queries[keep], candidates[keep])
        np.testing.assert_array_equal(ranks[keep], expected)
    assert all(np.isfinite(value) for value in retrieval.recall(a, v, block=5).values())


def test_frame_averaging():
    logits = np.array([[[0.0, 2.0]], [[2.0, 0.0]]])  # 2 frames, 1 clip, 2 classes
    np.testing.assert_allclose(evaluation.average_frame_predictions(logits, False), [[0.5, 0.5]])
    sig = 1 / (1 + np.exp(-2.0))
    np.testing.assert_allclose(
        evaluation.average_frame_predictions(logits, True), [[(0.5 + sig) / 2] * 2]
    )
