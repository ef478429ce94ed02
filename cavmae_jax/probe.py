"""The cheap first look before finetuning: a linear probe and k-NN on a frozen model's
embeddings (``embed.embedding_fn``: audio, visual, joint, mean-pooled, frame 5) of a prepared
dataset, trained on one set of splits and scored on another, or over its folds.

Single-label data: multinomial logistic regression on standardised features, and the majority
of the 5 nearest training clips by cosine; scores are accuracy. Multi-label data: one logistic
regression per class and the nearest clips' label frequencies; scores are mAP. A model whose
audio position table is longer than the dataset's clips gets it trimmed first (``init``'s rule).
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from cavmae_jax import evaluation
from cavmae_jax.embed import embedding_fn
from cavmae_jax.inference import predict_split
from cavmae_jax.sharding import make_mesh
from cavmae_jax.train.folds import summary
from cavmae_jax.train.init_weights import copy_weights
from input_pipeline import metadata
from input_pipeline.dataset import open_dataset

NEIGHBOURS = 5


def fitted_to(model, audio_length: int, fit: str = "trim"):
    """``model`` for clips of ``audio_length`` fbank frames (itself if it already is), and
    the line that says what changed."""
    if model.cfg.audio_length == audio_length:
        return model, []
    target = type(model)(model.cfg.replace(audio_length=audio_length), nnx.Rngs(0))
    return target, copy_weights(model, target, "the model", fit)


def split_embeddings(model, data_dir, split: str, batch_size: int, classes: int, norm) -> dict:
    """``audio``, ``visual``, ``joint`` [N, D] and ``label`` [N, K] of every clip of ``split``."""
    mesh = make_mesh({"data": -1})
    apply = embedding_fn(model, per_token=False)
    return predict_split(
        apply, mesh, data_dir, split, batch_size, num_classes=classes, all_frames=True, norm=norm
    )


def scores(train_x, train_y, test_x, multi_label: bool) -> dict[str, np.ndarray]:
    """Class scores [N_test, K] of the linear probe and of k-NN."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes = train_y.shape[1]
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    nearest = np.argsort(-(unit(test_x) @ unit(train_x).T), axis=1)[:, :NEIGHBOURS]
    knn = train_y[nearest].mean(axis=1)  # label frequencies among the neighbours
    if multi_label:
        linear = make_pipeline(
            StandardScaler(), OneVsRestClassifier(LogisticRegression(max_iter=2000))
        )
        linear.fit(train_x, train_y)
        return {"linear": linear.predict_proba(test_x), "knn": knn}
    y = train_y.argmax(axis=1)
    linear = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(train_x, y)
    full = np.zeros((len(test_x), classes))
    full[:, linear.classes_] = linear.predict_proba(test_x)
    return {"linear": full, "knn": knn}


def probe(
    model,
    data_dir,
    train_split: str,
    eval_split: str,
    batch_size: int = 8,
    norm: tuple[float, float] | None = None,
) -> dict:
    """``{embedding: {"linear": figure, "knn": figure}}`` (accuracy, or mAP for multi-label
    data), trained on ``train_split`` (names joined by ``+``) and scored on ``eval_split``."""
    info = metadata.read(data_dir)
    classes = info.get("classes") or 0
    frames = open_dataset(data_dir).info.features["fbank"].shape[0]
    model, notes = fitted_to(model, frames)
    train = split_embeddings(model, data_dir, train_split, batch_size, classes, norm)
    held = split_embeddings(model, data_dir, eval_split, batch_size, classes, norm)
    multi = bool((train["label"].sum(axis=1) > 1).any())
    metric = "mAP" if multi else "acc"
    result = {"metric": metric, "clips": int(len(held["label"])), "fitted": notes}
    for name in ("audio", "visual", "joint"):
        if name in train:
            found = scores(train[name], train["label"], held[name], multi)
            stats = {k: evaluation.classification_stats(s, held["label"]) for k, s in found.items()}
            result[name] = {k: float(v[metric]) for k, v in stats.items()}
    return result


def probe_folds(model, data_dir, folds: list[str], batch_size: int = 8, norm=None) -> dict:
    """``probe`` with each fold held out in turn; mean and sd (n - 1) per embedding and probe."""
    runs = [
        probe(model, data_dir, "+".join(f for f in folds if f != held), held, batch_size, norm)
        for held in folds
    ]
    result = {"metric": runs[0]["metric"], "folds": folds, "fitted": runs[0]["fitted"]}
    for name in ("audio", "visual", "joint"):
        if name in runs[0]:
            result[name] = {}
            for kind in ("linear", "knn"):
                found = summary([{"value": run[name][kind]} for run in runs], "value")
                values = [row["value"] for row in found["folds"]]
                result[name][kind] = {"mean": found["mean"], "sd": found["sd"], "folds": values}
    return result
