"""``cavmae prepare`` on a corpus of good and broken clips: report, dataset, resumption."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from cavmae_jax import cli
from input_pipeline import audio, prepare, synthetic, verify, video


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Good clips (one with spaces and non-ASCII in its name, a 48 kHz stereo one, a 2-second
    one) and bad ones (truncated, no audio, no video, empty, not a video)."""
    root = tmp_path_factory.mktemp("corpus")
    good = {
        "good_a.mp4": dict(cls=0),
        "good b été.mp4": dict(cls=1),
        "stereo48k.mp4": dict(cls=2, sample_rate=48000, stereo=True),
        "short.mp4": dict(cls=3, seconds=2.0),
    }
    for name, kwargs in good.items():
        synthetic.write_clip(root / name, seed=len(name), **kwargs)
    synthetic.write_clip(root / "no_audio.mp4", cls=0, seed=1, audio=False)
    synthetic.write_clip(root / "no_video.mp4", cls=0, seed=2, video=False)
    synthetic.write_clip(root / "full.mp4", cls=1, seed=3)
    data = (root / "full.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (root / "full.mp4").unlink()
    (root / "empty.mp4").write_bytes(b"")
    (root / "readme.txt").write_text("not a video")
    return root, sorted(good)


def read_dataset(path, split="train", jpeg_bytes=False):
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(path))
    decoders = {"frames": tfds.decode.SkipDecoding()} if jpeg_bytes else None
    return list(tfds.as_numpy(builder.as_dataset(split=split, decoders=decoders)))


def test_prepare_reports_every_bad_clip_and_keeps_every_good_one(corpus, tmp_path, capsys):
    root, good = corpus
    cli.main(["prepare", "--input", str(root), "--output", str(tmp_path / "ds"), "--workers", "2"])
    summary = capsys.readouterr().out
    assert "prepared 4 clips, 5 failed" in summary
    records = [json.loads(x) for x in (tmp_path / "ds" / "failures.jsonl").read_text().splitlines()]
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in records}
    assert by_name["empty.mp4"]["stage"] == "read"
    assert by_name["no_audio.mp4"]["reason"].startswith("no audio stream")
    assert by_name["no_video.mp4"]["reason"].startswith("no video stream")
    assert by_name["readme.txt"]["stage"] == "audio"
    assert by_name["truncated.mp4"]["stage"] in ("audio", "video")
    assert by_name["short.mp4"]["kept"] and "padded" in by_name["short.mp4"]["reason"]
    examples = read_dataset(tmp_path / "ds")
    ids = sorted(e["id"].decode() for e in examples)
    assert ids == sorted(name.rsplit(".", 1)[0] for name in good)
    for e in examples:
        assert e["fbank"].shape == (1024, 128) and e["fbank"].dtype == np.float32
        assert e["frames"].shape == (10, 224, 224, 3)
    stereo = next(e for e in examples if e["id"] == b"stereo48k")
    wav = audio.load_audio(root / "stereo48k.mp4")
    np.testing.assert_array_equal(stereo["fbank"], audio.compute_fbank(wav))
    short = next(e for e in examples if e["id"] == b"short")
    assert 195 <= short["audio_frames"] < 210 and np.all(short["fbank"][210:] == 0)


def test_frames_are_the_official_extraction_as_jpeg(corpus, tmp_path):
    root, _ = corpus
    prepare.prepare(root, tmp_path / "ds", progress=False)
    dataset = read_dataset(tmp_path / "ds", jpeg_bytes=True)
    example = next(e for e in dataset if e["id"] == b"good_a")
    official = video.extract_frames(root / "good_a.mp4")
    assert [bytes(b) for b in example["frames"]] == [video.encode_jpeg(f) for f in official]


def test_an_interrupted_run_resumes_to_the_same_dataset(corpus, tmp_path):
    root, _ = corpus
    one = tmp_path / "one"
    prepare.prepare(root, one, shard_size=3, progress=False)
    resumed = tmp_path / "resumed"
    prepare.prepare(root, resumed, shard_size=3, progress=False)
    # simulate a kill: the last shard's report (written after the shard, it marks the shard
    # complete) and the metadata were never written, a temp file was left
    shards = sorted(resumed.glob("clips-train.tfrecord-*"))
    shards[-1].rename(shards[-1].with_name(shards[-1].name + ".tmp"))
    sorted(resumed.glob("report-*.json"))[-1].unlink()
    for name in ("dataset_info.json", "features.json", "failures.jsonl"):
        (resumed / name).unlink()
    before = {p.name: p.stat().st_mtime_ns for p in shards[:-1]}
    prepare.prepare(root, resumed, shard_size=3, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in shards[:-1]} == before  # not redone
    for name in [p.name for p in sorted(one.glob("clips-train.tfrecord-*"))] + ["failures.jsonl"]:
        assert (one / name).read_bytes() == (resumed / name).read_bytes()


def test_official_json_datafile_with_label_csv(tmp_path, monkeypatch):
    """The official format: wav files and frame_<k>/<id>.jpg folders, labels by mid; relative
    paths resolve from the datafile's folder, wherever prepare runs."""
    frames_dir = tmp_path / "frames"
    synthetic.write_clip(tmp_path / "clip.mp4", cls=1, seed=0)
    wav_dir = tmp_path / "wav"
    wav_dir.mkdir()
    shutil.copy(tmp_path / "clip.mp4", wav_dir / "clip.mp4")  # PyAV reads the audio of any file
    for k, frame in enumerate(video.extract_frames(tmp_path / "clip.mp4")):
        if k == 7:
            continue  # missing frame: the official loader falls back to frame 6
        (frames_dir / f"frame_{k}").mkdir(parents=True)
        (frames_dir / f"frame_{k}" / "clip.jpg").write_bytes(video.encode_jpeg(frame))
    records = [
        {
            "video_id": "clip",
            "wav": "wav/clip.mp4",
            "video_path": "frames/",
            "labels": "/m/a,/m/c",
        },
        {
            "video_id": "gone",
            "wav": str(wav_dir / "gone.wav"),
            "video_path": str(frames_dir),
            "labels": "/m/a",
        },
    ]
    (tmp_path / "data.json").write_text(json.dumps({"data": records}))
    (tmp_path / "labels.csv").write_text("index,mid,display_name\n0,/m/a,A\n1,/m/b,B\n2,/m/c,C\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    prepared, failed = prepare.prepare(
        tmp_path / "data.json", tmp_path / "ds", labels=tmp_path / "labels.csv", progress=False
    )
    assert (prepared, failed) == (1, 1)
    (example,) = read_dataset(tmp_path / "ds")
    assert list(example["label"]) == [0, 2]
    np.testing.assert_array_equal(example["frames"][7], example["frames"][6])


def test_nothing_prepared_exits_non_zero(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.mp4").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["prepare", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "ds")])
    assert exit_info.value.code == 1


def test_prepare_killed_mid_run_resumes_to_the_same_dataset(tmp_path):
    import subprocess
    import sys
    import time

    clips = synthetic.generate(tmp_path / "videos", clips=16, classes=4, seed=3)
    labels = tmp_path / "videos" / "labels.csv"
    prepare.prepare(clips, tmp_path / "one", labels=labels, shard_size=2, progress=False)
    out = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "cavmae_jax.cli",
        "prepare",
        "--input",
        str(clips),
        "--output",
        str(out),
        "--labels",
        str(labels),
        "--shard-size",
        "2",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finished():  # a shard is complete once its report is written
        return [p for p in out.glob("report-*.json") if not p.name.endswith(".tmp")]

    deadline = time.monotonic() + 120
    while not finished() and time.monotonic() < deadline:
        time.sleep(0.005)
    process.kill()
    process.wait()
    done = finished()
    assert 1 <= len(done) < 8, "the kill should land mid-run"
    assert not (out / "dataset_info.json").exists()
    prepare.prepare(clips, out, labels=labels, shard_size=2, progress=False)
    reference = sorted(p.name for p in (tmp_path / "one").glob("clips-train.tfrecord-*"))
    assert sorted(p.name for p in out.glob("clips-train.tfrecord-*")) == reference
    for name in reference + ["failures.jsonl"]:
        assert (out / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def test_a_list_of_relative_paths_works_from_any_folder(tmp_path, monkeypatch):
    listing = synthetic.generate(tmp_path / "videos", clips=2, classes=2, seed=7)
    assert not listing.read_text().startswith("/")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    labels = tmp_path / "videos" / "labels.csv"
    assert prepare.prepare(listing, tmp_path / "ds", labels=labels, progress=False) == (2, 0)


def test_splits_are_added_to_one_directory_one_at_a_time(tmp_path):
    import tensorflow_datasets as tfds

    train = synthetic.generate(tmp_path / "train", clips=3, classes=3, seed=8)
    synthetic.generate(tmp_path / "eval", clips=2, classes=2, seed=9)
    for listing in ("clips.csv", "labels.csv"):
        (tmp_path / "eval" / listing).unlink()  # a folder of videos, no labels
    (tmp_path / "eval" / "broken.mp4").write_bytes(b"not a video")
    labels = tmp_path / "train" / "labels.csv"
    out = tmp_path / "ds"
    assert prepare.prepare(train, out, labels=labels, progress=False) == (3, 0)
    assert prepare.prepare(tmp_path / "eval", out, split="eval", progress=False) == (2, 1)
    splits = tfds.builder_from_directory(str(out)).info.splits
    assert {name: splits[name].num_examples for name in splits} == {"train": 3, "eval": 2}
    assert len(read_dataset(out, "train")) == 3 and len(read_dataset(out, "eval")) == 2
    records = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert [(r["split"], r["path"].rsplit("/", 1)[-1]) for r in records] == [("eval", "broken.mp4")]
    with pytest.raises(ValueError, match="prepare every split of a directory alike"):
        prepare.prepare(
            tmp_path / "eval",
            out,
            split="test",
            options=prepare.Options(fbank_dtype="float16"),
            progress=False,
        )


def test_a_corrupt_shard_is_named_with_the_command_that_rebuilds_it(tmp_path, capsys):
    import shlex
    import subprocess

    from input_pipeline.dataset import DatasetError, Loader, LoaderConfig

    listing = synthetic.generate(tmp_path / "videos", clips=4, classes=2, seed=10)
    out = tmp_path / "ds"
    labels = ["--labels", str(tmp_path / "videos" / "labels.csv")]
    cli.main(
        ["prepare", "--input", str(listing), "--output", str(out), "--shard-size", "2", *labels]
    )
    cli.main(["prepare", "--verify", str(out)])
    assert "train: every record read" in capsys.readouterr().out
    shard = sorted(out.glob("clips-train.tfrecord-*"))[1]
    intact = shard.read_bytes()
    shard.write_bytes(intact[: len(intact) // 2])

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["prepare", "--verify", str(out)])
    assert exit_info.value.code == 1
    printed = capsys.readouterr().out
    assert "train: 1 bad shard(s)" in printed and f"{shard}: " in printed
    loader = Loader(out, "train", LoaderConfig(batch_size=1, num_classes=2, train=False))
    with pytest.raises(DatasetError, match="rebuild it: rm") as error:
        list(loader)
    assert str(error.value).startswith(f"{shard}: ")

    rebuild = str(error.value).split("rebuild it: ", 1)[1]
    removal, command = rebuild.split(" && ")
    for name in shlex.split(removal)[1:]:
        Path(name).unlink()
    cavmae = shlex.split(command)
    assert cavmae[:2] == ["cavmae", "prepare"]
    subprocess.run([sys.executable, "-m", "cavmae_jax.cli", *cavmae[1:]], check=True)
    assert shard.read_bytes() == intact
    cli.main(["prepare", "--verify", str(out)])
    assert "train: every record read" in capsys.readouterr().out


def test_official_lists_are_matched_by_id_and_the_missing_clips_reported(tmp_path, capsys):
    """An AudioSet segment CSV naming 9 clips of 3 classes: 5 downloaded (two naming schemes),
    1 broken download, 3 never downloaded (class 0 loses 3 of its 5); and a VGGSound CSV
    (labels by name, one split)."""
    synthetic.generate(tmp_path / "gen", clips=6, classes=3, seed=11)
    videos = tmp_path / "videos"
    videos.mkdir()
    classes = ["/synthetic/0", "/synthetic/1", "/synthetic/2"]
    rows, downloaded = [], {0: "{y}_30.000", 1: "{y}", 2: "{y}_30.000", 3: "{y}", 4: "{y}_30.000"}
    for i in range(9):
        ytid = f"yt{i:09d}"
        label = classes[i % 3 if i < 6 else 0]  # the three never downloaded are all class 0
        rows.append(f'{ytid}, 30.000, 40.000, "{label},/m/extra"')
        if i in downloaded:
            name = downloaded[i].format(y=ytid) + ".mp4"
            shutil.copy(tmp_path / "gen" / f"clip_{i:05d}.mp4", videos / name)
    (videos / "yt000000005_30.000.mp4").write_bytes(b"broken download")
    header = "# Segments csv created Sun Mar  5 10:54:31 2017\n# YTID, start, end, labels\n"
    (tmp_path / "segments.csv").write_text(header + "\n".join(rows) + "\n")
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "index,mid,display_name\n0,/synthetic/0,Zero\n1,/synthetic/1,One\n2,/synthetic/2,Two\n"
        '3,/m/extra,"Extra, shared"\n'
    )
    out = tmp_path / "ds"
    command = ["prepare", "--input", str(tmp_path / "segments.csv"), "--videos", str(videos)]
    cli.main([*command, "--output", str(out), "--labels", str(labels)])
    printed = capsys.readouterr().out
    report = json.loads((out / "coverage.json").read_text())["train"]
    assert {k: report[k] for k in ("listed", "found", "prepared", "failed", "missing")} == {
        "listed": 9,
        "found": 6,
        "prepared": 5,
        "failed": 1,
        "missing": 3,
    }
    assert report["missing_ids"] == [
        "yt000000006_30.000",
        "yt000000007_30.000",
        "yt000000008_30.000",
    ]
    assert {label: (c["listed"], c["missing"]) for label, c in report["classes"].items()} == {
        "/synthetic/0": (5, 3),
        "/synthetic/1": (2, 0),
        "/synthetic/2": (2, 0),
        "/m/extra": (9, 3),
    }
    assert [c["name"] for c in report["classes_over_threshold"]] == ["Zero", "Extra, shared"]
    assert "9 listed, 6 found (66.7%), 5 prepared, 1 failed, 3 missing" in printed
    assert f"--videos {videos} " in verify.prepare_command(out, "train")  # how to rebuild
    examples = read_dataset(out)
    assert sorted(e["id"].decode() for e in examples) == [f"yt{i:09d}_30.000" for i in range(5)]
    assert all(
        sorted(e["label"]) == [i % 3, 3]
        for i, e in enumerate(sorted(examples, key=lambda e: e["id"]))
    )

    vgg = ["yt000000000,30,One,train", "yt000000001,30,Two,test", "yt000000009,7,Zero,train"]
    (tmp_path / "vggsound.csv").write_text("\n".join(vgg) + "\n")
    shutil.copy(tmp_path / "gen" / "clip_00001.mp4", videos / "yt000000009_000007.mp4")
    assert prepare.prepare(
        tmp_path / "vggsound.csv", tmp_path / "vgg", labels=labels, videos=videos, progress=False
    ) == (2, 0)
    assert sorted(e["id"].decode() for e in read_dataset(tmp_path / "vgg")) == [
        "yt000000000_000030",
        "yt000000009_000007",
    ]


@pytest.mark.parametrize(
    "beam_args",
    [(), ("--direct_num_workers=2", "--direct_running_mode=multi_processing")],
    ids=["direct-1", "direct-2-processes"],
)
def test_beam_gives_the_local_shards_and_failure_report(corpus, tmp_path, beam_args):
    root, _ = corpus
    local, beam = tmp_path / "local", tmp_path / "beam"
    assert prepare.prepare(root, local, shard_size=3, progress=False) == (4, 5)
    counts = prepare.prepare(root, beam, shard_size=3, runner="beam", beam_args=beam_args)
    assert counts == (4, 5)
    names = [p.name for p in sorted(local.glob("clips-train.tfrecord-*"))]
    assert names == [p.name for p in sorted(beam.glob("clips-train.tfrecord-*"))]
    for name in [*names, "failures.jsonl", "dataset_info.json"]:
        assert (local / name).read_bytes() == (beam / name).read_bytes(), name
