"""What a recipe leaves to its dataset, settled at start-up from ``dataset.json``: the clip
length (``model.audio_length = 0``), the classes (``data.classes = 0``), the loss of a
classifier (``loss = "auto"``: BCE for multi-label data, cross-entropy for single-label) and the
fbank normalisation (``data.norm``: ``audioset``, the official constants, or ``dataset``, the
training splits' own statistics). Each settled value is printed once.
"""

from __future__ import annotations

import jax
import ml_collections

from cavmae_jax.errors import UserError
from input_pipeline import metadata
from input_pipeline.audio import AUDIOSET_NORM

NORMS = ("audioset", "dataset")


def _say(line: str) -> None:
    if jax.process_index() == 0:
        print(line)


def _fbank_frames(data_dir) -> int:
    from input_pipeline.dataset import open_dataset

    return open_dataset(data_dir).info.features["fbank"].shape[0]


def settle(config: ml_collections.ConfigDict, data_dir) -> ml_collections.ConfigDict:
    """A copy of ``config`` with the dataset's values filled in; refuses a model whose clip
    length is not the dataset's."""
    config = ml_collections.ConfigDict(config.to_dict())
    info = metadata.read(data_dir)
    train = config.data.train_split
    frames = _fbank_frames(data_dir)
    if not config.model.audio_length:
        config.model.audio_length = frames
        _say(f"audio_length: {frames} fbank frames (the dataset's)")
    if config.model.audio_length != frames:
        raise UserError(
            f"{data_dir}: holds {frames}-frame fbanks, the model takes "
            f"{config.model.audio_length}: set --config.model.audio_length={frames} (the init's "
            "audio position table is trimmed or interpolated to it)"
        )
    if not config.data.classes:
        if not info.get("classes"):
            raise UserError(f"{data_dir}: records no classes; set --config.data.classes")
        config.data.classes = config.model.label_dim = info["classes"]
        _say(f"classes: {info['classes']} (the dataset's labels.csv)")
    if config.get("loss") == "auto":
        splits = info.get("splits", {})
        multi = sum(splits.get(s.strip(), {}).get("multi_label_clips", 0) for s in train.split("+"))
        config.loss = "bce" if multi else "ce"
        kind = "multi-label: sigmoid and mAP" if multi else "single-label: softmax and accuracy"
        _say(f"loss: {config.loss} ({kind})")
    if config.data.norm not in NORMS:
        raise UserError(f"data.norm {config.data.norm!r}: expected one of {list(NORMS)}")
    if config.data.norm == "dataset":
        config.data.fbank_mean, config.data.fbank_std = metadata.fbank_statistics(data_dir, train)
        where = f"the statistics of {data_dir} split {train}"
    else:
        config.data.fbank_mean, config.data.fbank_std = AUDIOSET_NORM
        where = "the AudioSet constants of the official recipes"
    _say(
        f"fbank normalisation: mean {config.data.fbank_mean:.4f}, std "
        f"{config.data.fbank_std:.4f} ({where})"
    )
    return config
