"""Classification evaluation of a finetuned model on a prepared split (spec 4.3, 4.5, 5.1).

Per-epoch validation: frame 5, full batches only (the official ``drop_last``), statistics of the
logits. Final evaluation: every clip, once per frame 0..9, the official statistics of the mean of
the ten sigmoid (mAP tasks) or softmax (accuracy tasks) outputs; a model that sees no image
(audio-only) is evaluated once, on frame 5.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cavmae_jax import evaluation
from cavmae_jax.losses import CLASSIFICATION_LOSSES
from cavmae_jax.train.inference import batches_per_host, gather_outputs
from cavmae_jax.train.steps import make_logits_step

EVAL_FRAME = 5


def split_logits(
    logits_of: Callable[[dict], dict], mesh: Mesh, data_dir: str | Path, split: str,
    batch_size: int, num_classes: int, frame: int = EVAL_FRAME, drop_last: bool = False,
) -> dict[str, np.ndarray]:  # fmt: skip
    """``logits`` and ``label`` [N, K] of a split evaluated on ``frame`` (global batch)."""
    from input_pipeline.dataset import Loader, LoaderConfig

    local_batch = batch_size // jax.process_count()
    config = LoaderConfig(
        batch_size=local_batch, num_classes=num_classes, train=False, frame=frame,
        drop_remainder=drop_last, process_index=jax.process_index(),
        process_count=jax.process_count(),
    )  # fmt: skip
    loader = Loader(data_dir, split, config)
    total = loader.builder.info.splits[split].num_examples
    count = batches_per_host(total, local_batch, drop_last)
    return gather_outputs(logits_of, loader, mesh, local_batch, count)


def validation_stats(logits: np.ndarray, labels: np.ndarray, loss: str) -> dict[str, float]:
    """mAP, mAUC, d-prime, accuracy and the loss of evaluation logits (the per-epoch record)."""
    stats = evaluation.classification_stats(logits, labels)
    summary = {name: stats[name] for name in ("mAP", "mAUC", "d_prime", "acc")}
    summary["valid_loss"] = float(CLASSIFICATION_LOSSES[loss](logits, labels))
    return summary


def final_evaluation(
    logits_of: Callable[[dict], dict], mesh: Mesh, data_dir: str | Path, split: str,
    batch_size: int, num_classes: int, multilabel: bool, frames: tuple[int, ...],
) -> dict:  # fmt: skip
    """Official statistics of the frame-averaged probabilities over ``frames`` (one pass each),
    plus each frame's own mAP and accuracy (``per_frame``). Per-class AP/AUC are lists."""
    per_frame, logits, labels = [], [], None
    for frame in frames:
        out = split_logits(logits_of, mesh, data_dir, split, batch_size, num_classes, frame)
        labels = out["label"]
        logits.append(out["logits"])
        stats = evaluation.classification_stats(out["logits"], labels)
        per_frame.append({"frame": frame, "mAP": stats["mAP"], "acc": stats["acc"]})
    probs = evaluation.average_frame_predictions(np.stack(logits), multilabel)
    stats = evaluation.classification_stats(probs, labels)
    stats.update(AP=stats["AP"].tolist(), AUC=stats["AUC"].tolist())
    return {**stats, "per_frame": per_frame, "clips": int(len(labels))}


def replicated_logits_fn(model: nnx.Module, mesh: Mesh, mode: str) -> Callable[[dict], dict]:
    """``batch -> {"logits"}`` for a loaded model, its parameters replicated on ``mesh``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    replicated = NamedSharding(mesh, PartitionSpec())
    params, rest = jax.device_put((params, rest), replicated)
    step = make_logits_step(graphdef, mode)
    return lambda batch: step(params, rest, batch)
