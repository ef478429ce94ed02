"""Evaluation statistics: the official classification statistics and frame averaging.

Statistics follow ``src/utilities/stats.py`` (official behaviour 29): per-class average
precision and ROC AUC (scikit-learn's definitions, computed here with NumPy), mAP, mAUC,
d-prime, and single-label accuracy. Retrieval recall is ``cavmae_jax/retrieval.py``.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm


def _ranked(scores: np.ndarray, targets: np.ndarray):
    """Per class (columns): positives in descending score order with tied scores grouped.
    Returns cumulative true / false positives at the end of each distinct-score group."""
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    sorted_targets = targets[order]
    distinct = np.r_[np.nonzero(np.diff(sorted_scores))[0], len(scores) - 1]
    tps = np.cumsum(sorted_targets)[distinct]
    fps = (distinct + 1) - tps
    return tps, fps


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """sum_n (R_n - R_{n-1}) P_n over score thresholds (scikit-learn's step definition);
    0 for a class without positives, as scikit-learn returns."""
    tps, fps = _ranked(scores, targets > 0)
    if tps[-1] == 0:
        return 0.0
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Area under the ROC curve (trapezoids over distinct thresholds); -1 if a class is empty,
    as the official stats store it."""
    tps, fps = _ranked(scores, targets > 0)
    if tps[-1] == 0 or fps[-1] == 0:
        return -1.0
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.trapezoid(tpr, fpr))


def d_prime(auc: float) -> float:
    return float(np.sqrt(2.0) * norm.ppf(auc))


def classification_stats(scores: np.ndarray, targets: np.ndarray) -> dict:
    """Official statistics of ``scores`` and ``targets`` [N, K]: per-class ``AP`` and ``AUC``
    arrays, ``mAP``, ``mAUC``, ``d_prime`` (of mAUC) and ``acc`` (argmax accuracy)."""
    scores = np.asarray(scores, np.float64)
    targets = np.asarray(targets)
    ap = np.array([average_precision(scores[:, k], targets[:, k]) for k in range(scores.shape[1])])
    auc = np.array([roc_auc(scores[:, k], targets[:, k]) for k in range(scores.shape[1])])
    m_auc = float(np.mean(auc))
    return {
        "AP": ap,
        "AUC": auc,
        "mAP": float(np.mean(ap)),
        "mAUC": m_auc,
        "d_prime": d_prime(m_auc),
        "acc": float(np.mean(np.argmax(targets, 1) == np.argmax(scores, 1))),
    }


def average_frame_predictions(logits_per_frame: np.ndarray, multilabel: bool) -> np.ndarray:
    """Multi-frame evaluation: mean over frames of sigmoid (mAP tasks) or softmax (accuracy
    tasks) outputs. logits_per_frame [F, N, K] -> [N, K]."""
    logits = np.asarray(logits_per_frame, np.float64)
    if multilabel:
        probs = 1.0 / (1.0 + np.exp(-logits))
    else:
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs = shifted / shifted.sum(axis=-1, keepdims=True)
    return probs.mean(axis=0)
