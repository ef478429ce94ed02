"""Video: the official 10-frame extraction with PyAV, JPEG storage, the loader's transform.

Extraction (official behaviour 20, ``extract_video_frame.py``):
``total = min(frame count, int(fps * 10))``;
frame ``i`` of 10 is the decoded frame ``max(int(i * total / 10) - 1, 0)`` (OpenCV's seek to
``frame_idx - 1``); shorter side resized to 224 (PIL bilinear, as torchvision's ``Resize`` on a
PIL image), centre crop 224. The frame count is what actually decodes: one sample clip's header
claims 400 frames and 299 decode.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

NUM_FRAMES = 10
IMAGE_SIZE = 224
MAX_SECONDS = 10
# file suffixes taken for videos when a folder is searched for them
VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg"}
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class VideoError(ValueError):
    """A file whose video cannot be used; the message names the file and the reason."""


class NoVideoTrack(VideoError):
    """A file without a video stream (an audio file)."""


def frame_indices(total: int, count: int = NUM_FRAMES) -> list[int]:
    """Decoded-frame indices the official extraction reads for a clip of ``total`` frames."""
    return [max(int(i * total / count) - 1, 0) for i in range(count)]


def _decode(path: Path, wanted: set[int], limit: int) -> tuple[dict[int, np.ndarray], int]:
    """RGB frames at the ``wanted`` indices and the number of frames decoded (at most ``limit``)."""
    import av

    frames: dict[int, np.ndarray] = {}
    decoded = 0
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            if decoded in wanted:
                frames[decoded] = frame.to_ndarray(format="rgb24")
            decoded += 1
            if decoded >= limit:
                break
    return frames, decoded


def resize_shorter_side(image: np.ndarray, size: int, resample: str) -> np.ndarray:
    """torchvision ``Resize(size)`` on a PIL image: shorter side to ``size``, aspect kept
    (the longer side is ``int(size * long / short)``)."""
    from PIL import Image

    height, width = image.shape[:2]
    if min(height, width) == size:
        return image
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    method = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[resample]
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), method))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``CenterCrop``: offsets ``int(round((extent - size) / 2))``."""
    height, width = image.shape[:2]
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image[top : top + size, left : left + size]


def extract_frames(path: str | Path, size: int = IMAGE_SIZE) -> np.ndarray:
    """The official 10 frames of a video, uint8 [10, size, size, 3] RGB (before JPEG encoding)."""
    import av

    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise NoVideoTrack(f"{path}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            header_frames = stream.frames
        if not rate:
            raise VideoError(f"{path}: the video stream has no frame rate")
        limit = int(float(rate) * MAX_SECONDS)
        total = min(header_frames, limit) if header_frames else limit
        frames, decoded = _decode(path, set(frame_indices(total)), total)
        if decoded < total:  # the header over-counts: index what actually decodes
            total = decoded
            frames, decoded = _decode(path, set(frame_indices(total)), total)
    except av.error.FFmpegError as err:
        raise VideoError(f"{path}: cannot decode the video: {err}") from err
    except OSError as err:
        raise VideoError(f"{path}: cannot open: {err}") from err
    if decoded == 0:
        raise VideoError(f"{path}: the video stream decodes to no frames")
    return np.stack(
        [
            center_crop(resize_shorter_side(frames[i], size, "bilinear"), size)
            for i in frame_indices(total)
        ]
    )


def encode_jpeg(frame: np.ndarray) -> bytes:
    """JPEG bytes as torchvision's ``save_image`` writes them (PIL defaults: quality 75)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG")
    return buffer.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def preprocess_frame(frame: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """The loader's transform: Resize(size, bicubic), CenterCrop(size), /255, ImageNet mean/std.
    uint8 [H, W, 3] -> float32 [size, size, 3] (NHWC)."""
    image = center_crop(resize_shorter_side(frame, size, "bicubic"), size)
    return ((image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
