"""Checking a prepared dataset: every record of every shard read back and counted against the
metadata, and the command that rebuilds a bad shard.

A shard is rebuilt by removing it and its report and running the split's ``cavmae prepare``
again (``prepare-<split>.json`` records how it was made): prepare redoes exactly the shards
without a report, and writes the same bytes.
"""

from __future__ import annotations

import json
import shlex

from cavmae_jax import paths
from cavmae_jax.paths import Path
from input_pipeline.files import invocation_path, report_path


def prepare_command(data_dir, split: str) -> str:
    """The ``cavmae prepare`` command that made a split (as recorded), else its template."""
    data_dir = paths.path(data_dir)
    recorded = invocation_path(data_dir, split)
    made = json.loads(recorded.read_text()) if recorded.exists() else {"input": "INPUT"}
    words = ["cavmae", "prepare", "--input", made["input"], "--output", str(data_dir)]
    words += ["--split", split]
    for option in ("labels", "videos", "shard_size", "fbank_dtype"):
        if made.get(option) is not None:
            words += [f"--{option.replace('_', '-')}", str(made[option])]
    if made.get("keep_waveform"):
        words.append("--keep-waveform")
    return shlex.join(words)


def rebuild_hint(data_dir, split: str, index: int, shard: Path) -> str:
    report = report_path(paths.path(data_dir), split, index)
    return (
        f"rebuild it: rm {shlex.quote(str(shard))} {report} && {prepare_command(data_dir, split)}"
    )


def count_records(shard: Path) -> tuple[int, str | None]:
    """Records readable in a shard, and the reason reading stopped early (None: it did not)."""
    import tensorflow as tf

    count = 0
    try:
        for _ in tf.data.TFRecordDataset(str(shard)):
            count += 1
    except (tf.errors.DataLossError, tf.errors.NotFoundError) as err:
        return count, err.message.splitlines()[0]
    return count, None


def shard_problems(data_dir, split: str) -> list[str]:
    """One line per shard of ``split`` that is missing, unreadable or holds another count of
    records than the metadata says, with the command that rebuilds it."""
    import tensorflow_datasets as tfds

    info = tfds.builder_from_directory(str(data_dir)).info.splits[split]
    problems = []
    for index, (shard, expected) in enumerate(zip(info.filepaths, info.shard_lengths, strict=True)):
        count, error = count_records(shard)
        if error is None and count == expected:
            continue
        reason = error or f"{count} records, the metadata says {expected}"
        problems.append(f"{shard}: {reason}; {rebuild_hint(data_dir, split, index, shard)}")
    return problems


def verify(data_dir) -> dict[str, list[str]]:
    """Problems per split of a prepared dataset (an empty list: every record read)."""
    import tensorflow_datasets as tfds

    splits = tfds.builder_from_directory(str(data_dir)).info.splits
    return {name: shard_problems(data_dir, name) for name in splits}
