"""The official lists as ``cavmae prepare`` input, matched by clip id onto a folder (or bucket) of
downloaded videos, and the coverage report: what the list names and the folder lacks.

Lists: the AudioSet segment CSVs (``YTID, start_seconds, end_seconds, "labels"`` after ``#``
comment lines), the VGGSound CSV (``YTID,start,label name,split``; the rows of the split being
prepared) and the official JSON datafiles (``video_id``, ``labels``). Downloads are named by
their id, optionally with the start time: ``YTID.mp4``, ``YTID_30.000.mp4`` (AudioSet
downloaders), ``YTID_000030.mp4`` (VGGSound).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json

from cavmae_jax import paths
from cavmae_jax.errors import UserError
from input_pipeline.video import VIDEO_SUFFIXES


@dataclasses.dataclass(frozen=True)
class Listed:
    """A clip the list names: its id, its labels and the file stems a download of it may have."""

    id: str
    labels: tuple[str, ...]
    stems: tuple[str, ...]


def _stems(ytid: str, start: float) -> tuple[str, ...]:
    return (ytid, f"{ytid}_{start:.3f}", f"{ytid}_{int(start):06d}", f"{ytid}_{int(start)}")


def _audioset(lines: list[str]) -> list[Listed]:
    rows = csv.reader((line for line in lines if not line.startswith("#")), skipinitialspace=True)
    out = []
    for row in rows:
        if row:
            ytid, start, _end, labels = row[0], float(row[1]), row[2], row[3]
            tags = tuple(label for label in labels.split(",") if label)
            out.append(Listed(f"{ytid}_{start:.3f}", tags, _stems(ytid, start)))
    return out


def _vggsound(lines: list[str], split: str) -> list[Listed]:
    rows = [row for row in csv.reader(lines) if row]
    splits = sorted({row[3] for row in rows})
    if split not in splits:
        raise UserError(f"the VGGSound list has splits {splits}: prepare one of them (--split)")
    return [
        Listed(f"{ytid}_{int(start):06d}", (label,), _stems(ytid, int(start)))
        for ytid, start, label, row_split in rows
        if row_split == split
    ]


def _datafile(text: str) -> list[Listed]:
    return [
        Listed(r["video_id"], tuple(x for x in r["labels"].split(",") if x), (r["video_id"],))
        for r in json.loads(text)["data"]
    ]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def read_list(source: paths.PathLike, split: str) -> list[Listed]:
    """The clips of an official list, recognised by its content."""
    source = paths.path(source)
    text = source.read_text()
    if source.suffix == ".json":
        return _datafile(text)
    lines = text.splitlines()
    first = next(
        (row for row in csv.reader(line for line in lines if not line.startswith("#")) if row), []
    )
    start, end = (_number(first[i]) if len(first) > i else None for i in (1, 2))
    if len(first) >= 4 and start is not None and end is not None and end > start:
        return _audioset(lines)
    if len(first) == 4 and first[1].strip().isdigit():
        return _vggsound(lines, split)
    raise UserError(
        f"{source}: not an AudioSet segment CSV, a VGGSound CSV or an official JSON datafile"
    )


def match(listed: list[Listed], videos: paths.PathLike):
    """``(found: [(Listed, video path)], missing: [Listed])`` by file stem."""
    by_stem = {
        p.name.rsplit(".", 1)[0]: str(p)
        for p in paths.files(videos)
        if p.suffix.lower() in VIDEO_SUFFIXES
    }
    found, missing = [], []
    for item in listed:
        path = next((by_stem[s] for s in item.stems if s in by_stem), None)
        if path is None:
            missing.append(item)
        else:
            found.append((item, path))
    return found, missing


def coverage(
    listed: list[Listed],
    missing: list[Listed],
    failures: list[dict],
    names: dict[str, str],
    threshold: float = 0.2,
) -> dict:
    """Clips listed / found / prepared / failed (by stage) / missing, and per class how many of
    its listed clips are missing; classes missing more than ``threshold`` of theirs are named.
    ``failures`` are the split's records (kept ones included), ``names`` label -> display name."""
    failed = [r for r in failures if not r.get("kept")]
    per_class = collections.Counter(label for item in listed for label in item.labels)
    lost = collections.Counter(label for item in missing for label in item.labels)
    classes = {
        label: {
            "name": names.get(label, label),
            "listed": count,
            "missing": lost[label],
            "missing_fraction": lost[label] / count,
        }
        for label, count in sorted(per_class.items())
    }
    worst = sorted(
        (c for c in classes.values() if c["missing_fraction"] > threshold),
        key=lambda c: -c["missing_fraction"],
    )
    return {
        "listed": len(listed),
        "found": len(listed) - len(missing),
        "prepared": len(listed) - len(missing) - len(failed),
        "failed": len(failed),
        "failed_by_stage": dict(collections.Counter(r["stage"] for r in failed)),
        "missing": len(missing),
        "threshold": threshold,
        "classes_over_threshold": worst,
        "classes": classes,
        "missing_ids": [item.id for item in missing],
    }


def summary(report: dict) -> str:
    """Two printed lines: the counts, and the classes over the threshold."""
    listed = max(report["listed"], 1)
    lines = [
        f"coverage: {report['listed']} listed, {report['found']} found "
        f"({report['found'] / listed:.1%}), {report['prepared']} prepared, "
        f"{report['failed']} failed, {report['missing']} missing"
    ]
    worst = report["classes_over_threshold"]
    shown = ", ".join(f"{c['name']} ({c['missing_fraction']:.0%})" for c in worst[:10])
    more = f" and {len(worst) - 10} more" if len(worst) > 10 else ""
    lines.append(
        f"classes missing over {report['threshold']:.0%} of their clips: {shown or 'none'}{more}"
    )
    return "\n".join(lines)
