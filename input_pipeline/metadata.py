"""``dataset.json``: what ``cavmae prepare`` records about a dataset beside its TFDS metadata,
the clip length, the classes and, per split, the fbank statistics as float64 sums, so that
the statistics of any union of splits (``fold1+fold2``) are exact.

Statistics cover the real frames of each clip (``audio_frames``), not the zero padding.
"""

from __future__ import annotations

import json
import math

import numpy as np

from cavmae_jax import paths
from cavmae_jax.errors import UserError

METADATA = "dataset.json"
SUMS = ("fbank_frames", "fbank_sum", "fbank_sq_sum")


def clip_sums(fbank: np.ndarray, audio_frames: int) -> dict:
    """The statistics sums of one clip's real frames, in float64."""
    real = np.asarray(fbank[: max(0, min(int(audio_frames), len(fbank)))], np.float64)
    return {"fbank_frames": real.size, "fbank_sum": real.sum(), "fbank_sq_sum": (real**2).sum()}


def add_sums(records: list[dict]) -> dict:
    return {key: float(sum(r[key] for r in records)) for key in SUMS}


def mean_std(sums: dict) -> tuple[float, float]:
    n = sums["fbank_frames"]
    mean = sums["fbank_sum"] / n
    return mean, math.sqrt(max(sums["fbank_sq_sum"] / n - mean * mean, 0.0))


def read(data_dir) -> dict:
    """The dataset's ``dataset.json`` ({} for a dataset prepared before it was written)."""
    path = paths.path(data_dir) / METADATA
    return json.loads(path.read_text()) if path.exists() else {}


def write_split(data_dir, split: str, entry: dict, **fields) -> None:
    """Record ``split``'s entry and the dataset-wide ``fields``."""
    path = paths.path(data_dir) / METADATA
    metadata = read(data_dir)
    metadata.update(fields)
    metadata.setdefault("splits", {})[split] = entry
    path.write_text(json.dumps(metadata, indent=1))


def fbank_statistics(data_dir, splits: str) -> tuple[float, float]:
    """Mean and standard deviation of the fbank over the real frames of ``splits`` (one name or
    names joined by ``+``)."""
    recorded = read(data_dir).get("splits", {})
    names = [name.strip() for name in splits.split("+")]
    missing = [name for name in names if "fbank_sum" not in recorded.get(name, {})]
    if missing:
        raise UserError(
            f"{data_dir}: no fbank statistics of split {missing[0]} (prepared by an older "
            "cavmae prepare); prepare it again, or set --config.data.norm=audioset"
        )
    sums = add_sums([recorded[name] for name in names])
    if not sums["fbank_frames"]:
        raise UserError(f"{data_dir}: split {splits} has no audio frames to take statistics of")
    return mean_std(sums)
