"""A generated audio-visual dataset with real correspondence, written as mp4 files with PyAV.

Each class pairs a picture (a coloured shape on a dark background, moving slowly) with a sound
(a tone, a chirp or a noise band at a class-specific frequency). Every clip draws its own
position, motion, loudness and noise, so clips of one class differ while their audio and video
agree. ``labels.csv`` (official ``index,mid,display_name`` format) and ``clips.csv`` (file name,
labels; names resolve from the list's folder) are written beside the videos.
"""

from __future__ import annotations

import csv
from fractions import Fraction
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
FPS = 4
SIZE = 64
COLOURS = [
    (230, 60, 50),
    (60, 200, 80),
    (70, 110, 240),
    (240, 210, 60),
    (200, 80, 220),
    (60, 220, 220),
    (250, 140, 40),
    (240, 240, 240),
]
SHAPES = ["disc", "square", "bar", "ring"]
SOUNDS = ["tone", "chirp", "noise"]


def class_names(classes: int) -> list[str]:
    return [f"{SHAPES[c % len(SHAPES)]}-{SOUNDS[c % len(SOUNDS)]}-{c}" for c in range(classes)]


def _picture(cls: int, centre: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    dy, dx = y - centre[0], x - centre[1]
    radius = SIZE / 6
    shape = SHAPES[cls % len(SHAPES)]
    if shape == "disc":
        inside = dx**2 + dy**2 < radius**2
    elif shape == "square":
        inside = (np.abs(dx) < radius) & (np.abs(dy) < radius)
    elif shape == "bar":
        inside = (np.abs(dx) < radius * 1.6) & (np.abs(dy) < radius / 3)
    else:
        inside = np.abs(np.sqrt(dx**2 + dy**2) - radius) < radius / 3
    image = rng.integers(0, 40, (SIZE, SIZE, 3)).astype(np.float64)
    image[inside] = COLOURS[cls % len(COLOURS)]
    return np.clip(image, 0, 255).astype(np.uint8)


def _sound(cls: int, seconds: float, rng: np.random.Generator, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    base = 300.0 * 2 ** (cls * 0.6)  # class frequency, 300 Hz upwards
    kind = SOUNDS[cls % len(SOUNDS)]
    if kind == "tone":
        wave = np.sin(2 * np.pi * base * t)
    elif kind == "chirp":
        wave = np.sin(2 * np.pi * base * t * (1 + 0.5 * (t % 1.0)))
    else:
        spectrum = np.fft.rfft(rng.standard_normal(len(t)))
        freqs = np.fft.rfftfreq(len(t), 1 / rate)
        spectrum[np.abs(freqs - base) > base * 0.15] = 0
        wave = np.fft.irfft(spectrum, len(t))
        wave /= np.abs(wave).max() + 1e-9
    gain = rng.uniform(0.2, 0.5)
    return (gain * wave + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def write_clip(
    path: Path,
    cls: int,
    seed: int,
    seconds: float = 10.0,
    video: bool = True,
    audio: bool = True,
    sample_rate: int = SAMPLE_RATE,
    stereo: bool = False,
) -> None:
    """One mp4 of class ``cls`` (mpeg4 video, AAC audio; either stream can be left out).
    A stereo clip carries the class sound on the left channel and noise on the right."""
    rng = np.random.default_rng(seed)
    frames = samples = None
    if video:
        start = rng.uniform(SIZE * 0.3, SIZE * 0.7, 2)
        velocity = rng.uniform(-1.5, 1.5, 2)
        frames = [
            _picture(cls, tuple(np.clip(start + velocity * i, SIZE * 0.2, SIZE * 0.8)), rng)
            for i in range(int(seconds * FPS))
        ]
    if audio:
        samples = _sound(cls, seconds, rng, sample_rate)[None, :]
        if stereo:
            noise = 0.3 * rng.standard_normal(samples.shape).astype(np.float32)
            samples = np.concatenate([samples, noise])
    write_media(path, frames, samples, sample_rate)


def write_media(path: Path, frames, samples, sample_rate: int = SAMPLE_RATE, fps: int = FPS):
    """An mp4 of RGB frames (uint8 [H, W, 3], mpeg4 at ``fps``) and audio samples (float32
    [channels, N], AAC); either may be None."""
    import av

    with av.open(str(path), "w") as container:
        if frames is not None:
            vstream = container.add_stream("mpeg4", rate=fps)
            vstream.height, vstream.width = frames[0].shape[:2]
            vstream.pix_fmt = "yuv420p"
        if samples is not None:
            astream = container.add_stream("aac", rate=sample_rate)
            astream.layout = "stereo" if len(samples) == 2 else "mono"
        if frames is not None:
            for picture in frames:
                container.mux(vstream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
            container.mux(vstream.encode(None))
        if samples is not None:
            chunk = 1024
            for begin in range(0, samples.shape[1], chunk):
                piece = np.ascontiguousarray(samples[:, begin : begin + chunk])
                frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout=astream.layout.name)
                frame.sample_rate = sample_rate
                frame.pts = begin
                frame.time_base = Fraction(1, sample_rate)
                container.mux(astream.encode(frame))
            container.mux(astream.encode(None))


def generate(output: str | Path, clips: int = 200, classes: int = 4, seed: int = 0) -> Path:
    """Write ``clips`` mp4 files (classes in turn) plus ``labels.csv`` and ``clips.csv``.
    Returns the path of ``clips.csv``."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    names = class_names(classes)
    with open(output / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "mid", "display_name"])
        writer.writerows((i, f"/synthetic/{i}", name) for i, name in enumerate(names))
    rows = []
    for i in range(clips):
        cls = i % classes
        path = output / f"clip_{i:05d}.mp4"
        write_clip(path, cls, seed * 100003 + i)
        rows.append((path.name, f"/synthetic/{cls}"))
    with open(output / "clips.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return output / "clips.csv"


def class_folders(
    output: str | Path, classes: int = 10, per_class: int = 8, seconds: float = 5.0, seed: int = 0
) -> Path:
    """A labelled corpus of your-own-data shape: ``output/<class name>/<clip>.mp4``,
    ``per_class`` clips of ``seconds`` each per class (an ESC-50-like set by default)."""
    output = Path(output)
    for cls, name in enumerate(class_names(classes)):
        folder = output / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            write_clip(folder / f"{name}_{i:03d}.mp4", cls, seed * 100003 + cls * 1009 + i, seconds)
    return output
