"""Where a prepared dataset keeps its files: per split, the shards, one report per shard (what
it holds, where its records lie and which clips failed), the records' offsets of the whole split
and the record of the ``cavmae prepare`` call that made it."""

from __future__ import annotations

from cavmae_jax.paths import Path

DATASET_NAME = "clips"


def shard_path(output: Path, split: str, index: int, count: int) -> Path:
    return output / f"{DATASET_NAME}-{split}.tfrecord-{index:05d}-of-{count:05d}"


def report_path(output: Path, split: str, index: int) -> Path:
    return output / f"report-{split}-{index:05d}.json"


def invocation_path(output: Path, split: str) -> Path:
    return output / f"prepare-{split}.json"


def offsets_path(output: Path, split: str) -> Path:
    return output / f"offsets-{split}.npy"
