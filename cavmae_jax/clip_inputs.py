"""What the pretrained-model commands read: video files and folders of videos, as batches of model
inputs (normalised fbank, the 10 frames) with each clip's position among the inputs.

A video goes through the same extraction as ``cavmae prepare`` (fbank, the 10 official frames
as JPEGs, decoded again as the official loader does), so a clip gives the same inputs whether it
is read from its file or from a prepared dataset. A clip that cannot be read is reported on
stderr with its file and reason, and skipped.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import numpy as np

from cavmae_jax import paths
from cavmae_jax.errors import UserError
from input_pipeline.video import VIDEO_SUFFIXES

MEL_BINS = 128
FRAMES_SHAPE = (10, 224, 224, 3)  # the official 10 frames


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


def read_video(
    path: str, audio_length: int = 1024, norm: tuple[float, float] | None = None
) -> dict[str, np.ndarray] | None:
    """``{"audio": [audio_length, 128], "frames": [10, 224, 224, 3]}`` of one video (loader
    view; fbank normalised by ``norm``, AudioSet's by default), or None after reporting why it
    cannot be read."""
    from input_pipeline import audio, video
    from input_pipeline.prepare import Clip, ClipError, Options, process_clip

    mean, std = norm or audio.AUDIOSET_NORM
    try:
        options = Options(audio_length=audio_length)
        example, warning = process_clip(Clip(id=path, path=path), options)
    except ClipError as err:
        print(f"{path}: skipped ({err.stage}: {err.reason})", file=sys.stderr)
        return None
    if warning:
        print(f"{path}: {warning}", file=sys.stderr)
    frames = [video.preprocess_frame(video.decode_jpeg(j)) for j in example["frames"]]
    return {
        "audio": audio.normalize_fbank(example["fbank"], mean, std).astype(np.float32),
        "frames": np.stack(frames),
    }


def video_batches(
    files: list[str], batch_size: int, first: int, audio_length: int = 1024, norm=None
) -> Iterator[dict]:
    """Host batches ``{"audio", "image" [b, 10, 224, 224, 3], "position"}`` of the readable
    ones of ``files``, whose positions among all inputs start at ``first``."""
    rows = []
    for position, path in enumerate(files, first):
        example = read_video(path, audio_length, norm)
        if example is None:
            continue
        rows.append({"audio": example["audio"], "image": example["frames"], "position": position})
        if len(rows) == batch_size:
            yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}
            rows = []
    if rows:
        yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}
