"""Random access to the records of a prepared split, so that a training stream can start anywhere
in an epoch without reading what comes before it.

The shards are TFRecord files: each record is its length (8 bytes, little-endian), the masked
CRC-32C of the length, the serialized example and its masked CRC-32C. ``cavmae prepare`` notes
where each record lies (``framing``) in the shard's report and merges the notes into
``offsets-<split>.npy``; for a dataset prepared without them the shards' headers are read once.
A record is then one ranged read, checked against both CRCs as TensorFlow's own reader does.
"""

from __future__ import annotations

import functools
import os
import re
import struct

import google_crc32c
import numpy as np

from cavmae_jax import paths
from cavmae_jax.paths import Path
from input_pipeline.files import DATASET_NAME, offsets_path

HEADER = 12  # length and its CRC
FOOTER = 4  # the data's CRC
SHARD_NAME = re.compile(rf"{DATASET_NAME}-(.+)\.tfrecord-(\d+)-of-(\d+)$")


class RecordError(Exception):
    """A record that cannot be read as written: the shard is truncated or corrupt."""


MARK = ": record at byte "  # in every ``RecordError``


def framing(serialized: list[bytes]) -> list[list[int]]:
    """``[offset, size]`` of each record of a shard written from ``serialized`` in order."""
    spans, offset = [], 0
    for data in serialized:
        spans.append([offset, HEADER + len(data) + FOOTER])
        offset += HEADER + len(data) + FOOTER
    return spans


def scan(shard: Path) -> list[list[int]]:
    """``[offset, size]`` of each record, from the shard's length headers."""
    spans, offset = [], 0
    with paths.path(shard).open("rb") as f:
        while header := f.read(8):
            if len(header) < 8:
                raise RecordError(f"{shard}: truncated after byte {offset}")
            (length,) = struct.unpack("<Q", header)
            spans.append([offset, HEADER + length + FOOTER])
            offset += HEADER + length + FOOTER
            f.seek(offset)
    return spans


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _unframe(raw: bytes, shard: str, offset: int, size: int) -> bytes:
    """The serialized example of a record read whole, or a ``RecordError`` naming where."""
    where = f"{shard}{MARK}{offset}"
    if len(raw) != size:
        raise RecordError(f"{where}: truncated ({len(raw)} of {size} bytes)")
    length, length_crc = struct.unpack("<QI", raw[:HEADER])
    data = raw[HEADER:-FOOTER]
    (data_crc,) = struct.unpack("<I", raw[-FOOTER:])
    if length != len(data) or length_crc != _masked_crc(raw[:8]) or data_crc != _masked_crc(data):
        raise RecordError(f"{where}: corrupt (CRC mismatch)")
    return data


class Table:
    """The records of a split's share in shard order: their shard, offset and size, and a reader
    of one record by its row (local shards by ``pread``, bucket shards by ranged reads)."""

    def __init__(self, builder, share: str, data_dir):
        instructions = builder.info.splits[share].file_instructions
        spans = {}
        files, rows = [], []
        for number, instruction in enumerate(instructions):
            named = SHARD_NAME.match(os.path.basename(instruction.filename))
            split, shard = named.group(1), int(named.group(2))
            if split not in spans:
                spans[split] = _split_spans(builder, split, data_dir)
            first = sum(builder.info.splits[split].shard_lengths[:shard]) + instruction.skip
            span = spans[split][first : first + instruction.take]
            rows.append(np.column_stack([np.full(len(span), number), span]))
            files.append(os.fspath(instruction.filename))
        self.files = files
        self.rows = np.concatenate(rows) if rows else np.zeros((0, 3), np.int64)

    def read(self, row: int) -> bytes:
        number, offset, size = (int(v) for v in self.rows[row])
        shard = self.files[number]
        if paths.is_remote(shard):
            with paths.path(shard).open("rb") as f:
                f.seek(offset)
                raw = f.read(size)
        else:
            raw = os.pread(_descriptor(shard), size, offset)
        return _unframe(raw, shard, offset, size)

    def read_or_problem(self, row: int) -> tuple[bytes, bytes]:
        """``(serialized, b"")``, or ``(b"", the problem)`` for a graph that raises it itself
        (an exception inside ``tf.numpy_function`` is logged with its traceback)."""
        try:
            return self.read(row), b""
        except RecordError as err:
            return b"", str(err).encode()


@functools.cache
def _descriptor(shard: str) -> int:
    """One read-only descriptor per local shard, shared by the reading threads (``pread`` takes
    the position with each call)."""
    return os.open(shard, os.O_RDONLY)


def _split_spans(builder, split: str, data_dir) -> np.ndarray:
    """``[offset, size]`` of every record of ``split`` in shard order."""
    stored = offsets_path(paths.path(data_dir), split)
    if stored.exists():
        with stored.open("rb") as f:
            return np.load(f)
    shards = builder.info.splits[split].filepaths
    print(
        f"{data_dir}: no {stored.name} (prepared by an older cavmae prepare); reading the record "
        f"offsets of split {split} from its {len(shards)} shard(s)"
    )
    return np.array([span for shard in shards for span in scan(shard)], np.int64).reshape(-1, 2)
