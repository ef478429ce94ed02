"""The harder generated dataset: deterministic, a two-level hierarchy, and a per-clip draw that
shows in both the colour and the pitch (unless the clip is a mismatched one)."""

from __future__ import annotations

import colorsys
import csv
import json

import numpy as np
import pytest

from input_pipeline import audio, prepare, video
from input_pipeline import synthetic_hierarchy as hierarchy


def test_generation_is_deterministic_and_lists_every_clip(tmp_path):
    one = hierarchy.generate(tmp_path / "one", clips=5, seed=4, heldout=0.4, seconds=3)
    two = hierarchy.generate(tmp_path / "two", clips=5, seed=4, heldout=0.4, seconds=3)
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    listed = [
        row[0] for split in ("train", "eval") for row in csv.reader(open(one / f"{split}.csv"))
    ]
    assert sorted(listed) == sorted(n for n in names if n.endswith(".mp4"))
    other = hierarchy.generate(tmp_path / "other", clips=1, seed=5, seconds=3)
    assert (other / "clip_00000.mp4").read_bytes() != (one / "clip_00000.mp4").read_bytes()


def test_two_level_labels_reach_the_prepared_dataset(tmp_path):
    specs = hierarchy.plan(48)
    assert [s.label for s in specs] == [i % 24 for i in range(48)]
    assert all(s.super == s.label // 6 for s in specs)
    assert hierarchy.class_mid(20) == "/h/striped/2"
    out = hierarchy.generate(tmp_path / "gen", clips=30, seed=1, heldout=0.0, seconds=3)
    rows = list(csv.DictReader(open(out / "labels.csv")))
    assert len(rows) == 24 and rows[7]["mid"] == "/h/angular/1"
    assert [r["display_name"] for r in csv.DictReader(open(out / "superclasses.csv"))] == [
        "round",
        "angular",
        "pointed",
        "striped",
    ]
    records = json.loads((out / "clips.json").read_text())
    assert [r["super"] for r in records] == [r["label"] // 6 for r in records]
    pick = tmp_path / "pick.csv"
    pick.write_text(
        "".join(f"{out}/{r['file']},{hierarchy.class_mid(r['label'])}\n" for r in records[18:22])
    )
    prepared, failed = prepare.prepare(
        pick, tmp_path / "ds", labels=out / "labels.csv", progress=False
    )
    assert (prepared, failed) == (4, 0)
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(tmp_path / "ds"))
    labels = [int(e["label"][0]) for e in tfds.as_numpy(builder.as_dataset(split="train"))]
    assert labels == [18, 19, 20, 21]


def measured_hue(frames: np.ndarray) -> float:
    """Mean hue (circular) of the bright, saturated pixels: the shape's colour."""
    hsv = np.array([colorsys.rgb_to_hsv(*p) for p in frames.reshape(-1, 3) / 255.0])
    shape = (hsv[:, 1] > 0.5) & (hsv[:, 2] > 0.6)
    return float(np.angle(np.mean(np.exp(2j * np.pi * hsv[shape, 0]))) / (2 * np.pi) % 1)


def measured_pitch(waveform: np.ndarray) -> float:
    """Power centroid around the spectral peak (a tone's frequency, a noise band's centre)."""
    power = np.abs(np.fft.rfft(waveform)) ** 2
    freqs = np.fft.rfftfreq(len(waveform), 1 / audio.SAMPLE_RATE)
    peak = freqs[power.argmax()]
    near = np.abs(freqs - peak) < 0.25 * peak
    return float(np.sum(freqs[near] * power[near]) / np.sum(power[near]))


@pytest.mark.parametrize(
    "label, u, sound_u",
    [(14, 0.05, 0.05), (20, 0.42, 0.42), (23, 0.77, 0.77), (13, 0.6, 0.1), (21, 0.3, 0.9)],
)
def test_the_instance_draw_shows_in_colour_and_pitch(tmp_path, label, u, sound_u):
    """Noise bands and pulses (one frequency each): the hue is u placed in the super-class's
    hue band; the pitch is the class register shifted by the sound's draw, which for a
    mismatched clip is another one."""
    spec = hierarchy.ClipSpec("c.mp4", label, u, sound_u, "train", seed=label)
    hierarchy.write_clip(tmp_path / "c.mp4", spec, seconds=4)
    hue = measured_hue(video.extract_frames(tmp_path / "c.mp4")[3])
    expected = hierarchy.hue(label, u)
    assert min(abs(hue - expected), 1 - abs(hue - expected)) < 0.03
    assert int(hue * len(hierarchy.SUPERS)) == label // hierarchy.PER_SUPER
    pitch = measured_pitch(audio.load_audio(tmp_path / "c.mp4"))
    assert pitch == pytest.approx(hierarchy.pitch(label, sound_u), rel=0.03)
    if not spec.paired:
        assert abs(pitch / hierarchy.pitch(label, u) - 1) > 0.1


def test_mismatched_and_heldout_fractions():
    specs = hierarchy.plan(2000, seed=2, heldout=0.2, mismatched=0.1)
    assert np.mean([not s.paired for s in specs]) == pytest.approx(0.1, abs=0.02)
    assert np.mean([s.split == "eval" for s in specs]) == pytest.approx(0.2, abs=0.02)
