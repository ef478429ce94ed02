"""A harder generated audio-visual dataset: a two-level class hierarchy, every clip different,
and an instance attribute shared by the two modalities, for comparing CAV-MAE and PCAV-MAE.

* 4 super-classes x 6 classes. A super-class is a shape family (round, angular, pointed,
  striped) and a sound family (harmonic tone, chirp, noise band, pulses); its six classes
  differ in the shape's variant and in the sound's pitch register.
* Every clip draws its own position, scale, rotation, colour saturation and brightness, and
  background texture; its own tempo, timbre (harmonic weights) and background noise level.
* Instance pairing: one per-clip draw ``u`` in [0, 1) sets both the colour's hue within the
  super-class's quarter of the hue circle and a pitch offset within the class's register
  (+-0.2 octave, registers 0.5 octave apart), so a clip's true partner is findable beyond its
  class. The hue band is a super-class's colour family, a coarse cue shared by its classes
  like its shape and sound families.
* A fraction of clips (``mismatched``) take their sound's ``u`` from another draw: weak
  correspondence, recorded per clip.
* A held-out split (``heldout``) of the same classes.

Written beside the videos: ``train.csv`` and ``eval.csv`` (file name, class mid), ``labels.csv``
(24 classes, official format, mids ``/h/<super>/<class>``), ``superclasses.csv`` (4) and
``clips.json`` (per clip: file, class, super-class, u, sound u, paired, split).
"""

from __future__ import annotations

import colorsys
import csv
import dataclasses
import json
from pathlib import Path

import numpy as np

from input_pipeline.synthetic import SAMPLE_RATE, write_media

SIZE = 96
FPS = 4
SUPERS = ("round", "angular", "pointed", "striped")
SOUND_FAMILIES = ("tone", "chirp", "noise", "pulses")
PER_SUPER = 6
REGISTER = 0.5  # octaves between the pitch registers of a super-class's classes
INSTANCE = 0.2  # +- octaves of the per-clip pitch offset


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    file: str
    label: int  # fine class, super * PER_SUPER + variant
    u: float  # the instance draw: hue, and the pitch offset of a paired clip
    sound_u: float  # the draw the sound uses (u unless mismatched)
    split: str
    seed: int

    @property
    def super(self) -> int:
        return self.label // PER_SUPER

    @property
    def variant(self) -> int:
        return self.label % PER_SUPER

    @property
    def paired(self) -> bool:
        return self.u == self.sound_u


def class_mid(label: int) -> str:
    return f"/h/{SUPERS[label // PER_SUPER]}/{label % PER_SUPER}"


def pitch(label: int, u: float) -> float:
    """Fundamental (Hz) of a class's register shifted by the instance draw."""
    register = 200.0 * 2 ** ((label % PER_SUPER) * REGISTER)
    return register * 2 ** ((u - 0.5) * 2 * INSTANCE)


def hue(label: int, u: float) -> float:
    """The shape's hue: ``u`` across the inner 80% of the super-class's quarter of the circle."""
    return (label // PER_SUPER + 0.1 + 0.8 * u) / len(SUPERS)


def hue_colour(label: int, u: float, rng: np.random.Generator) -> np.ndarray:
    saturation, value = rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0)
    return 255 * np.array(colorsys.hsv_to_rgb(hue(label, u), saturation, value))


def _inside(spec: ClipSpec, dy, dx, radius):
    """The shape's pixels: its family, and its variant (aspect, outline or count)."""
    k = spec.variant
    family = SUPERS[spec.super]
    if family == "round":
        aspect = 1 + 0.35 * (k % 3)
        r = np.sqrt((dx / aspect) ** 2 + dy**2)
        return r < radius if k < 3 else np.abs(r - radius * 0.8) < radius * 0.25
    if family == "angular":
        aspect = 1 + 0.4 * (k % 3)
        box = np.maximum(np.abs(dx) / aspect, np.abs(dy))
        return box < radius if k < 3 else np.abs(box - radius * 0.8) < radius * 0.2
    if family == "pointed":
        points = 3 + k
        angle = np.arctan2(dy, dx)
        edge = radius * (0.55 + 0.45 * np.cos(points * angle) ** 2)
        return np.sqrt(dx**2 + dy**2) < edge
    stripes = 1 + k % 3
    period = 2 * radius / stripes
    band = (np.abs(dy) < radius) & (np.abs(dx) < radius * 1.2)
    solid = ((dy + radius) % period) < period * 0.5
    return band & (solid if k < 3 else solid & ((dx + radius) % (period * 0.7) < period * 0.5))


def _frames(spec: ClipSpec, seconds: float, rng: np.random.Generator) -> list[np.ndarray]:
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    waves = rng.uniform(0.05, 0.3, (3, 2))
    phases = rng.uniform(0, 2 * np.pi, 3)
    texture = sum(np.sin(w[0] * x + w[1] * y + p) for w, p in zip(waves, phases, strict=True))
    background = (25 + 12 * texture)[..., None] * rng.uniform(0.5, 1.0, 3)
    colour = hue_colour(spec.label, spec.u, rng)
    radius = SIZE * rng.uniform(0.12, 0.22)
    start, velocity = rng.uniform(SIZE * 0.3, SIZE * 0.7, 2), rng.uniform(-1.0, 1.0, 2)
    angle, spin = rng.uniform(0, np.pi), rng.uniform(-0.1, 0.1)
    frames = []
    for i in range(int(seconds * FPS)):
        cy, cx = np.clip(start + velocity * i, SIZE * 0.25, SIZE * 0.75)
        turn = angle + spin * i
        dy = (y - cy) * np.cos(turn) - (x - cx) * np.sin(turn)
        dx = (y - cy) * np.sin(turn) + (x - cx) * np.cos(turn)
        image = background + rng.normal(0, 3, (SIZE, SIZE, 3))
        image[_inside(spec, dy, dx, radius)] = colour
        frames.append(np.clip(image, 0, 255).astype(np.uint8))
    return frames


def _sound(spec: ClipSpec, seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = pitch(spec.label, spec.sound_u)
    tempo = rng.uniform(1.0, 3.0)
    family = SOUND_FAMILIES[spec.super]
    if family == "tone":
        weights = rng.uniform(0.2, 1.0, 4) * np.array([1.0, 0.6, 0.4, 0.25])
        wave = sum(w * np.sin(2 * np.pi * f0 * (h + 1) * t) for h, w in enumerate(weights))
    elif family == "chirp":
        sweep = (t * tempo) % 1.0
        wave = np.sin(2 * np.pi * f0 * (t + 0.15 * sweep**2 / tempo))
    elif family == "noise":
        spectrum = np.fft.rfft(rng.standard_normal(len(t)))
        freqs = np.fft.rfftfreq(len(t), 1 / SAMPLE_RATE)
        spectrum[np.abs(freqs - f0) > f0 * 0.06] = 0
        wave = np.fft.irfft(spectrum, len(t))
    else:
        envelope = (np.sin(2 * np.pi * tempo * t) > 0.3).astype(np.float64)
        wave = envelope * np.sin(2 * np.pi * f0 * t)
    wave = wave / (np.abs(wave).max() + 1e-9)
    noise = rng.uniform(0.005, 0.05) * rng.standard_normal(len(t))
    return (rng.uniform(0.25, 0.5) * wave + noise).astype(np.float32)


def write_clip(path: Path, spec: ClipSpec, seconds: float = 10.0) -> None:
    rng = np.random.default_rng(spec.seed)
    write_media(path, _frames(spec, seconds, rng), _sound(spec, seconds, rng)[None], fps=FPS)


def plan(clips: int, seed: int = 0, heldout: float = 0.2, mismatched: float = 0.1):
    """The clips' specs: classes in turn, draws and splits from ``seed``."""
    rng = np.random.default_rng(seed)
    classes = len(SUPERS) * PER_SUPER
    specs = []
    for i in range(clips):
        u = float(rng.uniform())
        sound_u = float(rng.uniform()) if rng.uniform() < mismatched else u
        split = "eval" if rng.uniform() < heldout else "train"
        seed_i = int(rng.integers(2**31))
        specs.append(ClipSpec(f"clip_{i:05d}.mp4", i % classes, u, sound_u, split, seed_i))
    return specs


def generate(
    output: str | Path,
    clips: int = 480,
    seed: int = 0,
    heldout: float = 0.2,
    mismatched: float = 0.1,
    seconds: float = 10.0,
) -> Path:
    """Write the clips and their lists under ``output``; returns ``output``."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    specs = plan(clips, seed, heldout, mismatched)
    for spec in specs:
        write_clip(output / spec.file, spec, seconds)
    for split in ("train", "eval"):
        with open(output / f"{split}.csv", "w", newline="") as f:
            rows = [(s.file, class_mid(s.label)) for s in specs if s.split == split]
            csv.writer(f).writerows(rows)
    with open(output / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "mid", "display_name"])
        for label in range(len(SUPERS) * PER_SUPER):
            name = f"{SUPERS[label // PER_SUPER]} {label % PER_SUPER}"
            writer.writerow([label, class_mid(label), name])
    with open(output / "superclasses.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "mid", "display_name"])
        writer.writerows((i, f"/h/{name}", name) for i, name in enumerate(SUPERS))
    records = [{**dataclasses.asdict(s), "super": s.super, "paired": s.paired} for s in specs]
    (output / "clips.json").write_text(json.dumps(records, indent=1))
    return output
