"""Labels of clips from a finetuned model, as the official final evaluation scores them.

Scores are the sigmoid (AudioSet models, trained with BCE) or softmax (VGGSound, cross-entropy)
outputs averaged over the 10 frames when the mode sees frames, over frame 5's audio alone
otherwise; ``logits`` are the logits averaged the same way.
"""

from __future__ import annotations

import csv
import importlib.resources

import jax
import jax.numpy as jnp
from flax import nnx

from cavmae_jax.errors import UserError
from cavmae_jax.evaluators import frame_ensemble
from cavmae_jax.inference import predict_inputs
from cavmae_jax.models.cav_mae_ft import FT_MODES, SUM_MODE
from cavmae_jax.sharding import make_mesh

AUDIO_MODES = ("audioonly",)
AUDIOSET_CLASSES = 527


def label_names(csv_path=None, classes: int = AUDIOSET_CLASSES) -> list[str] | None:
    """``display_name`` by index from an official label CSV (index, mid, display_name); the
    AudioSet list shipped with the package for 527-class models when none is given."""
    if csv_path is None:
        if classes != AUDIOSET_CLASSES:
            return None
        text = importlib.resources.files("cavmae_jax.data").joinpath("class_labels_indices_as.csv")
        rows = list(csv.DictReader(text.read_text().splitlines()))
    else:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"index", "display_name"} <= set(rows[0]):
            raise UserError(f"{csv_path}: not a label CSV (columns index, mid, display_name)")
    names = {int(r["index"]): r["display_name"] for r in rows}
    if len(names) != classes:
        raise UserError(f"{csv_path}: {len(names)} labels, the model has {classes} outputs")
    return [names[i] for i in range(classes)]


def scores_fn(model, mode: str, loss: str):
    """Jitted ``batch -> {"scores", "logits"}`` [B, classes]."""
    kind = type(model).__name__
    if kind not in ("CAVMAEFT", "CAVMAEFTAudio"):
        raise UserError(f"a {kind} model has no classifier; classify needs a finetuned model")
    if mode not in (*FT_MODES, SUM_MODE):
        raise UserError(f"unknown mode {mode!r}; expected one of {(*FT_MODES, SUM_MODE)}")
    if loss not in ("bce", "ce"):
        raise UserError(f"unknown loss {loss!r}; expected bce (sigmoid) or ce (softmax)")
    audio_only = kind == "CAVMAEFTAudio" or mode in AUDIO_MODES
    graphdef, state = nnx.split(model)

    @jax.jit
    def apply(state, batch):
        m = nnx.merge(graphdef, state)
        if audio_only:
            logits = m(batch["audio"], None, mode=mode)[None]
        else:
            frames = jnp.moveaxis(batch["image"], 1, 0)
            logits = jax.lax.map(lambda image: m(batch["audio"], image, mode=mode), frames)
        return {"scores": frame_ensemble(logits, loss), "logits": logits.mean(axis=0)}

    return lambda batch: apply(state, batch)


def classify(
    model,
    inputs: list[str],
    mode: str,
    loss: str,
    top_k: int = 5,
    labels=None,
    batch_size: int = 8,
    split: str = "eval",
    norm: tuple[float, float] | None = None,
) -> list[dict]:
    """One result per readable clip: ``{"path", "mode", "top": [{"index", "name", "score"}],
    "logits"}`` (top-k by score); in a multi-process run the processes share the clips and
    each returns every result."""
    names = label_names(labels, model.cfg.label_dim)
    mesh = make_mesh({"data": -1})
    scores = scores_fn(model, mode, loss)
    length = model.cfg.audio_length
    ids, out = predict_inputs(scores, inputs, mesh, batch_size, split, length, norm)
    results = []
    for path, scores, logits in zip(ids, out["scores"], out["logits"], strict=True):
        order = scores.argsort()[::-1][:top_k]
        top = [
            {"index": int(i), "name": names[i] if names else None, "score": float(scores[i])}
            for i in order
        ]
        results.append({"path": path, "mode": mode, "top": top, "logits": logits.tolist()})
    return results
