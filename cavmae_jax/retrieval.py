"""Audio-visual retrieval with a trained model: embeddings of a prepared dataset, recall@k.

As the official ``retrieval.py`` (spec 5.2): unmasked ``forward_feat`` (modality-specific
streams), mean over tokens, cosine similarity; evaluation-mode data (frame 5, no augmentation).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from cavmae_jax import convert, evaluation


def embed(model, batches) -> tuple[np.ndarray, np.ndarray]:
    """Mean-pooled audio and visual embeddings [N, D] of every batch (one jitted function)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def pooled(state, audio, image):
        feat_a, feat_v = nnx.merge(graphdef, state).forward_feat(audio, image)
        return feat_a.mean(axis=1), feat_v.mean(axis=1)

    audio_emb, visual_emb = [], []
    for batch in batches:
        a, v = pooled(state, batch["audio"], batch["image"])
        audio_emb.append(np.asarray(a))
        visual_emb.append(np.asarray(v))
    return np.concatenate(audio_emb), np.concatenate(visual_emb)


def dataset_retrieval(model_dir: str | Path, data_dir: str | Path, split: str = "train",
                      batch_size: int = 32) -> dict[str, float]:  # fmt: skip
    """Recall@1/5/10 both ways on a prepared dataset, plus ``chance_r1`` = 1 / N."""
    from input_pipeline.dataset import Loader, LoaderConfig

    model = convert.load_checkpoint(model_dir)
    config = LoaderConfig(batch_size=batch_size, num_classes=1, train=False)  # labels unused
    loader = Loader(data_dir, split, config)
    audio_emb, visual_emb = embed(model, loader)
    result = evaluation.retrieval_recall(audio_emb, visual_emb)
    result.update(clips=len(audio_emb), chance_r1=1.0 / len(audio_emb))
    return result
