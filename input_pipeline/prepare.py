"""Prepare: videos (a folder, a folder per class, a CSV list, or the official JSON datafile) ->
a TFDS dataset.

One example per clip: ``id``, ``fbank`` [audio_length, 128] (log-Mel, not normalised; 1024
frames by default, float32 by default, float16 optionally), ``frames`` (10 JPEGs, the official
extraction), ``label`` (class indices), ``audio_frames`` (real fbank frames before padding; 0 for
a clip given silent audio) and optionally ``waveform`` (int16 at 16 kHz, for exact
waveform-domain mixup). Labels named by class folders or a CSV column get their label CSV
written (``labels.csv``); folds (a CSV column, or assigned per class) become splits ``fold<k>``.
``dataset.json`` records the clip length, the classes and each split's fbank statistics.
Clips are processed in parallel by worker processes (pure NumPy / PyAV); the parent writes
fixed-size shards atomically, so an interrupted run resumes where it stopped and produces the
same dataset. Unusable clips go to ``failures.jsonl`` with the split, stage and reason; nothing
is ever replaced by a dummy example. One directory holds several splits (``train``, ``eval``,
...), prepared one at a time with the same options.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import multiprocessing
import os
from collections.abc import Iterator

import numpy as np

from cavmae_jax import paths
from cavmae_jax.errors import UserError
from cavmae_jax.paths import Path
from input_pipeline import audio, metadata, official_lists, video
from input_pipeline.files import (
    DATASET_NAME,
    invocation_path,
    offsets_path,
    report_path,
    shard_path,
)
from input_pipeline.records import framing, scan

SHARD_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
TARGET_LENGTH = 1024
SHORT_SECONDS = 9.0  # clips with less audio are padded and flagged in the report


@dataclasses.dataclass(frozen=True)
class Clip:
    """One manifest entry: a video file, or official pre-extracted wav + frame folder."""

    id: str
    path: str  # the video, or the wav for official datafiles
    labels: tuple[str, ...] = ()
    frames_dir: str | None = None  # official ``video_path``: frames in frame_<k>/<id>.jpg
    fold: str | None = None


@dataclasses.dataclass(frozen=True)
class Options:
    fbank_dtype: str = "float32"
    keep_waveform: bool = False
    label_index: dict[str, int] | None = None
    audio_length: int = TARGET_LENGTH  # fbank frames kept (padded or cut)
    no_audio: str = "skip"  # a clip without an audio track: skip (reported) | silent (flagged)
    no_video: str = "skip"  # a clip without a video track: skip (reported) | blank (flagged)


class ClipError(Exception):
    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage, self.reason = stage, reason


# Manifests -------------------------------------------------------------------------------------


def _from_list(listing: Path, entry: str, media_dir: str | None = None) -> str:
    """A path written in a list: as it is when absolute or in a bucket, else from
    ``media_dir`` or the list's own folder (so a list works wherever ``cavmae prepare`` runs)."""
    if paths.is_remote(entry) or os.path.isabs(entry):
        return entry
    return str((paths.path(media_dir) if media_dir else listing.parent) / entry)


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def read_manifest(
    source: paths.PathLike,
    label_column: str | None = None,
    fold_column: str | None = None,
    media_dir: str | None = None,
) -> list[Clip]:
    """Clips from a folder (every non-hidden file), a folder of class folders
    (``root/<class>/<clip>``, labelled by folder), a CSV (path[, comma-separated labels]; with
    ``label_column``, a CSV with a header whose first column is the path; relative paths from
    ``media_dir``, else from the CSV's folder) or an official JSON datafile (video_id, wav,
    video_path, labels)."""
    source = paths.path(source)
    if source.is_dir():
        entries = _visible(source)
        if entries and all(p.is_dir() for p in entries):
            return [
                Clip(f"{folder.name}/{_stem(p.name)}", str(p), (folder.name,))
                for folder in entries
                for p in _visible(folder)
                if p.is_file()
            ]
        return [Clip(_stem(p.name), str(p)) for p in entries if p.is_file()]
    if label_column or fold_column:
        return _from_table(source, label_column, fold_column, media_dir)
    if source.suffix == ".json":
        records = json.loads(source.read_text())["data"]
        return [
            Clip(
                r["video_id"],
                _from_list(source, r["wav"]),
                tuple(_split_labels(r["labels"])),
                _from_list(source, r["video_path"]),
            )
            for r in records
        ]
    rows = [row for row in csv.reader(source.read_text().splitlines()) if row and row[0].strip()]
    return [
        Clip(
            row[0].rsplit("/", 1)[-1].rsplit(".", 1)[0],
            _from_list(source, row[0], media_dir),
            tuple(_split_labels(",".join(row[1:]))),
        )
        for row in rows
    ]


def _from_table(source: Path, label_column, fold_column, media_dir) -> list[Clip]:
    """A CSV with a header (ESC-50's ``filename,fold,target,category,...``): the path in the
    first column, labels (comma-separated) and the fold in the named columns."""
    rows = list(csv.DictReader(source.read_text().splitlines()))
    columns = list(rows[0]) if rows else []
    for column in (label_column, fold_column):
        if column and column not in columns:
            raise UserError(f"{source}: no column {column!r} (it has {columns})")
    return [
        Clip(
            _stem(row[columns[0]].rsplit("/", 1)[-1]),
            _from_list(source, row[columns[0]], media_dir),
            tuple(_split_labels(row[label_column])) if label_column else (),
            fold=str(row[fold_column]).strip() if fold_column else None,
        )
        for row in rows
        if row[columns[0]].strip()
    ]


def assign_folds(clips: list[Clip], folds: int) -> list[Clip]:
    """Folds 1..``folds`` dealt in turn within each label set (in manifest order), so that every
    fold holds each class about equally."""
    seen: dict[tuple, int] = {}
    out = []
    for clip in clips:
        k = seen.get(clip.labels, 0)
        seen[clip.labels] = k + 1
        out.append(dataclasses.replace(clip, fold=str(k % folds + 1)))
    return out


def _split_labels(text: str) -> list[str]:
    return [label.strip() for label in text.split(",") if label.strip()]


def _label_rows(path: paths.PathLike) -> list[dict]:
    return list(csv.DictReader(paths.path(path).read_text().splitlines()))


def read_label_csv(path: paths.PathLike) -> dict[str, int]:
    """Official label CSV (index,mid,display_name) -> {mid: index}, display names too (the
    VGGSound list names its labels)."""
    rows = _label_rows(path)
    return {
        **{row["display_name"]: int(row["index"]) for row in rows},
        **{row["mid"]: int(row["index"]) for row in rows},
    }


# One clip --------------------------------------------------------------------------------------


def _official_frames(clip: Clip) -> list[bytes]:
    """The 10 stored JPEGs of an official datafile entry, with the loader's fallback to lower
    frame indices when one is missing."""
    frames = []
    for k in range(video.NUM_FRAMES):
        for j in range(k, -1, -1):
            path = paths.path(f"{clip.frames_dir}/frame_{j}/{clip.id}.jpg")
            if path.is_file():
                frames.append(path.read_bytes())
                break
        else:
            raise ClipError("video", f"no frame_{k} (or lower) image under {clip.frames_dir}")
    return frames


def process_clip(clip: Clip, options: Options) -> tuple[dict, str | None]:
    """The example of one clip and a warning (or None); raises ``ClipError`` if unusable."""
    source = paths.path(clip.path)
    if not source.is_file():
        raise ClipError("read", f"no such file: {clip.path}")
    if source.stat().length == 0:
        raise ClipError("read", "empty file")
    with paths.local_copy(clip.path) as local:
        return _decode(clip, local, options)


def _decode(clip: Clip, local: str, options: Options) -> tuple[dict, str | None]:
    silent, notes = False, []
    try:
        waveform = audio.load_audio(local)
    except audio.NoAudioTrack as err:
        if options.no_audio != "silent":
            raise ClipError("audio", "no audio stream (--no-audio silent keeps it)") from err
        seconds = options.audio_length * audio.FRAME_SHIFT / audio.SAMPLE_RATE
        waveform, silent = np.zeros(int(seconds * audio.SAMPLE_RATE), np.float32), True
    except audio.AudioError as err:
        raise ClipError("audio", str(err).removeprefix(f"{local}: ")) from err
    if len(waveform) < audio.FRAME_LENGTH:
        raise ClipError("audio", f"only {len(waveform)} samples: shorter than one fbank frame")
    if clip.frames_dir is not None:
        jpegs = _official_frames(clip)
    else:
        try:
            jpegs = [video.encode_jpeg(f) for f in video.extract_frames(local)]
        except video.NoVideoTrack as err:
            if options.no_video != "blank":
                raise ClipError("video", "no video stream (--no-video blank keeps it)") from err
            black = video.encode_jpeg(np.zeros((video.IMAGE_SIZE, video.IMAGE_SIZE, 3), np.uint8))
            jpegs, notes = [black] * video.NUM_FRAMES, ["no video track: given black frames"]
        except video.VideoError as err:
            raise ClipError("video", str(err).removeprefix(f"{local}: ")) from err
    labels = []
    for label in clip.labels:
        if options.label_index is None or label not in options.label_index:
            raise ClipError("labels", f"unknown label {label!r}")
        labels.append(options.label_index[label])
    fbank = audio.compute_fbank(waveform, target_length=options.audio_length)
    example = {
        "id": clip.id,
        "fbank": fbank.astype(options.fbank_dtype),
        "frames": jpegs,
        "label": np.array(labels, np.int64),
        "audio_frames": np.int32(0 if silent else audio.num_frames(len(waveform))),
    }
    if options.keep_waveform:
        example["waveform"] = np.round(waveform * 32768).clip(-32768, 32767).astype(np.int16)
    seconds = len(waveform) / audio.SAMPLE_RATE
    if silent:
        notes.append("no audio track: given silent audio (audio_frames 0)")
    elif seconds < SHORT_SECONDS * options.audio_length / TARGET_LENGTH:
        notes.append(f"audio is {seconds:.2f} s: padded")
    return example, "; ".join(notes) or None


def decode_job(args: tuple[int, Clip, Options]) -> tuple[int, dict | None, dict | None]:
    """Worker: (position, example or None, report record or None)."""
    position, clip, options = args
    try:
        example, warning = process_clip(clip, options)
    except ClipError as err:
        return position, None, {"path": clip.path, "stage": err.stage, "reason": err.reason}
    except Exception as err:  # an unforeseen decoder failure: report it, never hide it
        return position, None, {"path": clip.path, "stage": "unknown", "reason": repr(err)}
    record = {"path": clip.path, "stage": "audio", "reason": warning, "kept": True}
    return position, example, record if warning else None


# Writing ---------------------------------------------------------------------------------------


def features(options: Options):
    """The TFDS feature specification of one example."""
    import tensorflow_datasets as tfds

    spec = {
        "id": tfds.features.Text(),
        "fbank": tfds.features.Tensor(
            shape=(options.audio_length, 128), dtype=np.dtype(options.fbank_dtype)
        ),
        "frames": tfds.features.Sequence(
            tfds.features.Image(shape=(224, 224, 3), encoding_format="jpeg"), length=10
        ),
        "label": tfds.features.Tensor(shape=(None,), dtype=np.int64),
        "audio_frames": tfds.features.Scalar(dtype=np.int32),
    }
    if options.keep_waveform:
        spec["waveform"] = tfds.features.Tensor(shape=(None,), dtype=np.int16)
    return tfds.features.FeaturesDict(spec)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a split's shards go, and which positions of the clip list each holds."""

    output: str
    split: str
    shard_size: int
    count: int
    clips: int

    def members(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.clips))


def shard_writer(layout: Layout, options: Options):
    """``write(shard, done)``: writes shards of ``layout`` (the feature spec built once)."""
    spec = features(options)
    return lambda shard, done: write_shard(layout, shard, done, spec)


def write_shard(layout: Layout, shard: int, done: list[tuple], spec) -> None:
    """Write a shard from its clips' ``(example or None, record or None)`` in list order."""
    examples = [e for e, _ in done if e is not None]
    records = [r for _, r in done if r is not None]
    output = paths.path(layout.output)
    _write_shard(output, layout.split, shard, layout.count, examples, records, spec)


def _run_local(jobs: list, layout: Layout, options: Options, workers: int, progress: bool):
    """Clips on a pool of worker processes; each shard written as soon as its clips are done."""
    from tqdm import tqdm

    spec = features(options)
    results: dict[int, tuple[dict | None, dict | None]] = {}
    context = multiprocessing.get_context("spawn")
    with (
        context.Pool(workers) if workers > 1 else _InlinePool() as pool,
        tqdm(total=len(jobs), desc="prepare", disable=not progress) as bar,
    ):
        for pos, example, record in pool.imap_unordered(decode_job, jobs, chunksize=1):
            results[pos] = (example, record)
            bar.update()
            shard = pos // layout.shard_size
            if all(m in results for m in layout.members(shard)):
                write_shard(layout, shard, [results.pop(m) for m in layout.members(shard)], spec)


def _write_shard(output, split, index, count, examples, records, spec) -> None:
    """The shard, then its report (its example count and the clips' failure records): a shard
    whose report exists is complete, also in a bucket."""
    import tensorflow as tf

    sums = metadata.add_sums([metadata.clip_sums(e["fbank"], e["audio_frames"]) for e in examples])
    multi = sum(len(e["label"]) > 1 for e in examples)

    serialized = []
    for example in examples:
        # protobuf map order varies between processes: sort it, so reruns are bytewise equal
        proto = tf.train.Example.FromString(spec.serialize_example(example))
        serialized.append(proto.SerializeToString(deterministic=True))

    def write_report(tmp: str) -> None:
        report = {"examples": len(examples), "records": records, "multi_label": multi, **sums}
        with open(tmp, "w") as f:
            json.dump({**report, "offsets": framing(serialized)}, f)

    def write_examples(tmp: str) -> None:
        with tf.io.TFRecordWriter(tmp) as writer:
            for data in serialized:
                writer.write(data)

    paths.publish(shard_path(output, split, index, count), write_examples)
    paths.publish(report_path(output, split, index), write_report)


def _reports(output: Path, split: str, count: int) -> tuple[list[int], list[dict], list[dict]]:
    """Example count per shard, the failure records (with their split), and the shards' own
    summaries (statistics sums, multi-label clips, record offsets) of a split."""
    sizes, records, summaries = [], [], []
    for i in range(count):
        report = json.loads(report_path(output, split, i).read_text())
        sizes.append(report["examples"])
        records.extend({**r, "split": split} for r in report["records"])
        summaries.append(report)
    return sizes, records, summaries


def _write_offsets(output: Path, split: str, summaries: list[dict]) -> None:
    """``offsets-<split>.npy``: every record's ``[offset, size]`` in its shard, shard after
    shard (a report written before reports noted them: its shard's headers are read)."""
    count = len(summaries)
    spans = [
        summary["offsets"] if "offsets" in summary else scan(shard_path(output, split, i, count))
        for i, summary in enumerate(summaries)
    ]
    table = np.array([span for shard in spans for span in shard], np.int64).reshape(-1, 2)
    paths.save_array(offsets_path(output, split), table)


def _other_splits(output: Path, split: str, spec) -> list:
    """The SplitInfos of the directory's other splits; their features must be this split's."""
    import tensorflow_datasets as tfds

    if not (output / "dataset_info.json").exists():
        return []
    info = tfds.builder_from_directory(str(output)).info
    if repr(info.features) != repr(spec):
        raise UserError(
            f"{output} holds splits {list(info.splits)} prepared with other options "
            "(--fbank-dtype, --keep-waveform, --audio-length): prepare every split of a "
            "directory alike"
        )
    return [info.splits[name] for name in info.splits if name != split]


def _finish(output: Path, split: str, count: int, spec, options: Options) -> tuple[int, list]:
    """Merge the per-shard reports and write the TFDS metadata of every split, ``dataset.json``
    and ``failures.jsonl`` of every split. Returns this split's (examples, records)."""
    import tensorflow_datasets as tfds

    others = _other_splits(output, split, spec)
    sizes, records, summaries = _reports(output, split, count)
    _record_split(output, split, sizes, summaries, options)
    _write_offsets(output, split, summaries)
    everything = [r for s in others for r in _reports(output, s.name, s.num_shards)[1]]
    everything += records
    (output / "failures.jsonl").write_text("".join(json.dumps(r) + "\n" for r in everything))
    template = tfds.core.ShardedFileTemplate(
        data_dir=output,
        template=SHARD_TEMPLATE,
        dataset_name=DATASET_NAME,
        split=split,
        filetype_suffix="tfrecord",
    )
    files = [shard_path(output, split, i, count) for i in range(count)]
    split_info = tfds.core.SplitInfo(
        name=split,
        shard_lengths=sizes,
        num_bytes=sum(f.stat().length for f in files),
        filename_template=template,
    )
    tfds.folder_dataset.write_metadata(
        data_dir=output,
        features=spec,
        split_infos=[*others, split_info],
        filename_template=template,
        check_data=False,
    )
    return sum(sizes), records


def _record_split(output: Path, split: str, sizes: list, summaries: list, options) -> None:
    """``dataset.json``: this split's clips and statistics sums, the clip length and classes."""
    entry = {"clips": sum(sizes)}
    if all("fbank_sum" in s for s in summaries):
        sums = metadata.add_sums(summaries)
        entry.update(sums)
        if sums["fbank_frames"]:
            entry["fbank_mean"], entry["fbank_std"] = metadata.mean_std(sums)
    entry["multi_label_clips"] = sum(s.get("multi_label", 0) for s in summaries)
    index = options.label_index or {}
    metadata.write_split(
        output,
        split,
        entry,
        audio_length=options.audio_length,
        classes=len(set(index.values())),
    )


def _pending(clips: list[Clip], output: Path, split: str, shard_size: int) -> Iterator[int]:
    count = max(1, -(-len(clips) // shard_size))
    for i in range(count):
        if not report_path(output, split, i).exists():
            yield i


def prepare(
    source: str | Path,
    output: str | Path,
    labels: str | Path | None = None,
    workers: int = 1,
    split: str = "train",
    shard_size: int = 256,
    options: Options | None = None,
    progress: bool = True,
    videos: str | Path | None = None,
    coverage_threshold: float = 0.2,
    runner: str = "local",
    beam_args: tuple[str, ...] = (),
    label_column: str | None = None,
    fold_column: str | None = None,
    folds: int = 0,
    media_dir: str | None = None,
) -> tuple[int, int]:
    """Build the dataset; resumes from finished shards. Returns (prepared, failed) clip counts.
    With ``videos``, ``source`` is an official list whose clips are looked up there by id, and
    ``coverage.json`` reports what the folder lacks. ``runner``: ``local`` (a process pool of
    ``workers``), ``beam`` (Beam's DirectRunner) or a Beam runner's name, with ``beam_args``
    (Beam pipeline options); every runner writes the same shards. Without ``labels``, the
    names of class folders or of ``label_column`` get indices in sorted order, written to
    ``OUTPUT/labels.csv`` (other lists name official labels and need their label CSV). With
    ``fold_column`` or ``folds`` each fold becomes a split ``fold<k>`` instead of ``split``."""
    output = paths.path(output)
    output.mkdir(parents=True, exist_ok=True)
    options = options or Options()
    if options.audio_length <= 0 or options.audio_length % 16:
        raise UserError(f"--audio-length {options.audio_length}: a positive multiple of 16")
    if videos is None:
        clips = read_manifest(source, label_column, fold_column, media_dir)
    else:
        listed = official_lists.read_list(source, split)
        found, missing = official_lists.match(listed, videos)
        clips = [Clip(item.id, path, item.labels) for item, path in found]
        if listed and not clips:
            raise UserError(f"none of the {len(listed)} clips of {source} is in {videos}")
    if not clips:
        raise UserError(f"{source}: no clips listed")
    if labels is None and any(clip.labels for clip in clips):
        if not (label_column or paths.path(source).is_dir()):
            # official lists name AudioSet / VGGSound labels: their indices are the label CSV's
            raise UserError(f"{source} lists labels: give the label CSV (--labels) to index them")
        labels = _written_labels(output, clips)
    if labels is not None:
        options = dataclasses.replace(options, label_index=read_label_csv(labels))
    if folds:
        clips = assign_folds(clips, folds)
    made = {
        "input": str(paths.path(source)),
        "labels": None if labels is None else str(paths.path(labels)),
        "videos": None if videos is None else str(paths.path(videos)),
        "shard_size": shard_size,
        "fbank_dtype": options.fbank_dtype,
        "keep_waveform": options.keep_waveform,
        "audio_length": options.audio_length,
        "no_audio": options.no_audio,
        "no_video": options.no_video,
    }
    if fold_column or folds:
        groups = {}
        for clip in clips:
            groups.setdefault(f"fold{clip.fold}", []).append(clip)
    else:
        groups = {split: clips}
    prepared, records = 0, []
    for name, members in sorted(groups.items()):
        invocation_path(output, name).write_text(json.dumps(made))
        count, found = _prepare_split(
            members, output, name, shard_size, options, workers, progress, runner, beam_args
        )
        prepared, records = prepared + count, records + found
    if videos is not None:
        names = {row["mid"]: row["display_name"] for row in _label_rows(labels)} if labels else {}
        report = official_lists.coverage(listed, missing, records, names, coverage_threshold)
        _write_coverage(output, split, report)
    return prepared, sum(1 for r in records if not r.get("kept"))


def _written_labels(output: Path, clips: list[Clip]) -> Path:
    """``OUTPUT/labels.csv`` (official ``index,mid,display_name``) of the clips' label names in
    sorted order; kept when an earlier split wrote it, which must then name every label."""
    target = output / "labels.csv"
    names = sorted({label for clip in clips for label in clip.labels})
    if target.exists():
        known = set(read_label_csv(target))
        unknown = [name for name in names if name not in known]
        if unknown:
            raise UserError(
                f"{output}: labels {unknown[:3]} are not in its labels.csv, written when "
                "another split was prepared: prepare every split in one directory from one "
                "label set (or give --labels)"
            )
        return target
    rows = [["index", "mid", "display_name"], *([i, n, n] for i, n in enumerate(names))]
    with target.open("w") as f:
        csv.writer(f).writerows(rows)
    return target


def _prepare_split(clips, output, split, shard_size, options, workers, progress, runner, beam_args):
    """One split's shards, reports and metadata; its prepared clips and failure records."""
    count = max(1, -(-len(clips) // shard_size))
    spec = features(options)
    jobs = [
        (pos, clips[pos], options)
        for shard in _pending(clips, output, split, shard_size)
        for pos in range(shard * shard_size, min((shard + 1) * shard_size, len(clips)))
    ]
    layout = Layout(str(output), split, shard_size, count, len(clips))
    if runner == "local":
        _run_local(jobs, layout, options, workers, progress)
    else:
        from input_pipeline import beam_prepare

        writer = functools.partial(shard_writer, layout, options)
        beam_prepare.run(jobs, decode_job, writer, shard_size, runner, beam_args)
    return _finish(output, split, count, spec, options)


def _write_coverage(output: Path, split: str, report: dict) -> None:
    """``coverage.json``: the coverage report of each split prepared from an official list."""
    target = output / "coverage.json"
    reports = json.loads(target.read_text()) if target.exists() else {}
    reports[split] = report
    target.write_text(json.dumps(reports, indent=1))


class _InlinePool:
    """The Pool interface in this process (workers=1: no process start-up, easy debugging)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap_unordered(self, fn, jobs, chunksize=1):
        return map(fn, jobs)
