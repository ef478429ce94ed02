"""Embeddings of clips from a pretrained or finetuned model: audio, visual and joint.

Audio and visual embeddings are the official retrieval features (unmasked modality streams,
mean-pooled); the joint one is the shared layers over both token sets (what the multimodal
classifier pools). Frame 5, as the official evaluation.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from cavmae_jax import paths
from cavmae_jax.inference import EVAL_FRAME, predict_inputs
from cavmae_jax.sharding import make_mesh


def embedding_fn(model, per_token: bool):
    """Jitted ``batch -> {name: array}`` (the model's ``features``, mean-pooled, and with
    ``per_token`` every token's); a model without visual parameters gives audio only."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def apply(state, batch):
        tokens = nnx.merge(graphdef, state).features(batch["audio"], batch["image"][:, EVAL_FRAME])
        out = {name: t.mean(axis=1) for name, t in tokens.items()}
        if per_token:
            out.update({f"{name}_tokens": t for name, t in tokens.items()})
        return out

    return lambda batch: apply(state, batch)


def embed(
    model,
    inputs: list[str],
    output,
    batch_size: int = 8,
    per_token: bool = False,
    split: str = "eval",
    norm: tuple[float, float] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Write ``<name>.npy`` (row i is clip i of ``ids.txt``) under ``output`` (process 0 of a
    multi-process run, which shares the clips between its processes); returns shapes. Videos
    are read at the model's clip length, normalised by ``norm`` (AudioSet's by default)."""
    mesh = make_mesh({"data": -1})
    apply, length = embedding_fn(model, per_token), model.cfg.audio_length
    ids, outputs = predict_inputs(apply, inputs, mesh, batch_size, split, length, norm)
    shapes = {name: array.shape for name, array in outputs.items()}
    if jax.process_index():
        return shapes
    output = paths.path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "ids.txt").write_text("".join(f"{i}\n" for i in ids))
    for name, array in outputs.items():
        paths.save_array(output / f"{name}.npy", array.astype(np.float32))
    return shapes
