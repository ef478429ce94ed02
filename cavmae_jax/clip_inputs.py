"""What the pretrained-model commands read: video files, folders of videos, or a prepared dataset,
as batches of model inputs (normalised fbank, frames) with each clip's id.

A video goes through the same extraction as ``cavmae prepare`` (fbank, the 10 official frames
as JPEGs, decoded again as the official loader does), so a clip gives the same inputs whether it
is read from its file or from a prepared dataset. A clip that cannot be read is reported on
stderr with its file and reason, and skipped.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from cavmae_jax import paths
from cavmae_jax.errors import UserError
from cavmae_jax.sharding import global_batch
from input_pipeline.video import VIDEO_SUFFIXES


def is_dataset(path: paths.PathLike) -> bool:
    return (paths.path(path) / "dataset_info.json").exists()


def video_files(inputs: list[str]) -> list[str]:
    """Each input file, and the video files (by suffix, sorted) of each input folder."""
    files = []
    for name in inputs:
        path = paths.path(name)
        if path.is_dir():
            found = sorted(str(p) for p in paths.files(path) if p.suffix.lower() in VIDEO_SUFFIXES)
            if not found:
                raise UserError(f"{name}: no video files ({', '.join(sorted(VIDEO_SUFFIXES))})")
            files += found
        elif path.is_file():
            files.append(name)
        else:
            raise UserError(f"{name}: no such file or folder")
    return files


def read_video(path: str) -> dict[str, np.ndarray] | None:
    """``{"audio": [1024, 128], "frames": [10, 224, 224, 3]}`` of one video (loader view), or
    None after reporting why it cannot be read."""
    from input_pipeline import audio, video
    from input_pipeline.prepare import Clip, ClipError, Options, process_clip

    try:
        example, warning = process_clip(Clip(id=path, path=path), Options())
    except ClipError as err:
        print(f"{path}: skipped ({err.stage}: {err.reason})", file=sys.stderr)
        return None
    if warning:
        print(f"{path}: {warning}", file=sys.stderr)
    frames = [video.preprocess_frame(video.decode_jpeg(j)) for j in example["frames"]]
    return {
        "audio": audio.normalize_fbank(example["fbank"]).astype(np.float32),
        "frames": np.stack(frames),
    }


def _video_batches(files: list[str], batch_size: int) -> Iterator[tuple[list[str], dict]]:
    ids, rows = [], []
    for path in files:
        example = read_video(path)
        if example is None:
            continue
        ids.append(path)
        rows.append(example)
        if len(rows) == batch_size:
            yield ids, {k: np.stack([r[k] for r in rows]) for k in rows[0]}
            ids, rows = [], []
    if rows:
        yield ids, {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _dataset_batches(data_dir, split: str, batch_size: int) -> Iterator[tuple[list[str], dict]]:
    from input_pipeline.dataset import Loader, LoaderConfig

    config = LoaderConfig(batch_size=batch_size, num_classes=1, train=False, all_frames=True)
    for batch in Loader(data_dir, split, config):
        ids = [i.decode() for i in batch["id"]]
        yield ids, {"audio": batch["audio"], "frames": batch["image"]}


def batches(
    inputs: list[str], batch_size: int, split: str = "eval"
) -> Iterator[tuple[list[str], dict[str, np.ndarray]]]:
    """``(ids, {"audio" [b, 1024, 128], "frames" [b, 10, 224, 224, 3]})`` over the inputs: one
    prepared dataset (its ``split``), or video files and folders (ids are their paths)."""
    if len(inputs) == 1 and is_dataset(inputs[0]):
        yield from _dataset_batches(inputs[0], split, batch_size)
        return
    yield from _video_batches(video_files(inputs), batch_size)


def run_batched(apply, inputs: list[str], mesh: Mesh, batch_size: int, split: str = "eval"):
    """``apply(global batch) -> {name: [B, ...]}`` over every readable clip, each batch padded
    to ``batch_size`` and split over ``mesh``; returns the ids and the outputs, in order."""
    if batch_size % mesh.size:
        raise UserError(f"--batch-size {batch_size} is not a multiple of the {mesh.size} devices")
    ids, outputs = [], {}
    for batch_ids, local in batches(inputs, batch_size, split):
        rows = len(batch_ids)
        padded = {
            k: np.concatenate([v, np.zeros((batch_size - rows, *v.shape[1:]), v.dtype)])
            for k, v in local.items()
        }
        for name, value in apply(global_batch(padded, mesh)).items():
            outputs.setdefault(name, []).append(np.asarray(jax.device_get(value))[:rows])
        ids += batch_ids
    if not ids:
        raise UserError(f"{' '.join(inputs)}: no clip could be read")
    return ids, {name: np.concatenate(parts) for name, parts in outputs.items()}
