"""Input pipeline speed on this machine: ``prepare`` clips/s per worker and loader clips/s.

prepare: the two real sample clips (256x144 12.5 fps and 1280x720 30 fps, AAC 44.1 kHz stereo),
each listed ``--repeat`` times, one worker process; then the 256x144 clip listed
``--scale-repeat`` times through every runner on the same list: the local pool with 1 and 2
processes and Beam's DirectRunner with 1 worker and with 2 worker processes; and, from the
per-worker rates, the time and cost of AS-2M on a cluster (``--cluster-workers``,
``--price-per-core-hour``: an assumption to set, printed with the result). Loader: a generated
dataset of ``--clips`` clips, training mode (random frame decode, fbank, SpecAugment, mixup,
noise + roll), batches of 32 and 256.

    python bench/pipeline_throughput.py
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

from input_pipeline import prepare, synthetic
from input_pipeline.dataset import Loader, LoaderConfig

SAMPLES = Path(__file__).resolve().parents[1] / "tests" / "data"  # the two real sample clips


def prepare_rate(work: Path, repeat: int) -> list[tuple[str, float]]:
    rates = []
    for clip in sorted(SAMPLES.glob("*.mp4")):
        listing = work / f"{clip.stem}.csv"
        with open(listing, "w", newline="") as f:
            csv.writer(f).writerows([[str(clip)]] * repeat)
        start = time.perf_counter()
        prepare.prepare(listing, work / f"ds-{clip.stem}", progress=False)
        rates.append((clip.name, repeat / (time.perf_counter() - start)))
    return rates


RUNNERS = {
    "local pool, 1 process": dict(workers=1),
    "local pool, 2 processes": dict(workers=2),
    "Beam DirectRunner, 1 worker": dict(runner="beam"),
    "Beam DirectRunner, 2 worker processes": dict(
        runner="beam",
        beam_args=("--direct_num_workers=2", "--direct_running_mode=multi_processing"),
    ),
}
AS2M_CLIPS = 1_772_023  # the official AS-2M training list


def runner_rates(work: Path, repeat: int) -> dict[str, tuple[float, int]]:
    """clips/s and workers of each runner on the same list (the 256x144 clip ``repeat`` times)."""
    listing = work / "scale.csv"
    clip = SAMPLES / "00W1lcxW-WU_40.000.mp4"
    with open(listing, "w", newline="") as f:
        csv.writer(f).writerows([[str(clip)]] * repeat)
    rates = {}
    for name, kwargs in RUNNERS.items():
        start = time.perf_counter()
        prepare.prepare(listing, work / f"ds-{len(rates)}", progress=False, **kwargs)
        workers = 2 if "2" in name else 1
        rates[name] = (repeat / (time.perf_counter() - start), workers)
    return rates


def loader_rate(data_dir: Path, batch_size: int, batches: int) -> float:
    config = LoaderConfig(
        batch_size=batch_size,
        num_classes=4,
        freqm=48,
        timem=192,
        mixup=0.5,
        label_smooth=0.1,
        noise=True,
    )
    stream = iter(Loader(data_dir, "train", config))
    next(stream)  # warm-up: graph building
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--clips", type=int, default=300)
    parser.add_argument("--scale-repeat", type=int, default=300)
    parser.add_argument("--cluster-workers", type=int, default=500)
    parser.add_argument("--price-per-core-hour", type=float, default=0.06)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        per_clip = {}
        for name, rate in prepare_rate(work, args.repeat):
            per_clip[name] = rate
            print(f"prepare, 1 process, {name}: {rate:.2f} clips/s")
        for name, (rate, workers) in runner_rates(work, args.scale_repeat).items():
            print(f"prepare, {name}: {rate:.2f} clips/s, {rate / workers:.2f} per worker")
        for name, rate in per_clip.items():
            hours = AS2M_CLIPS / (rate * args.cluster_workers) / 3600
            cost = AS2M_CLIPS / rate / 3600 * args.price_per_core_hour
            print(
                f"AS-2M ({AS2M_CLIPS} clips) at the {name} rate on {args.cluster_workers} "
                f"one-core workers: {hours:.1f} h, {cost:.0f} $ at "
                f"{args.price_per_core_hour} $ per core-hour (assumed)"
            )
        start = time.perf_counter()
        listing = synthetic.generate(work / "videos", clips=args.clips, classes=4)
        print(f"generated {args.clips} demo clips in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        prepare.prepare(listing, work / "ds", labels=work / "videos" / "labels.csv", progress=False)
        rate = args.clips / (time.perf_counter() - start)
        print(f"prepare, 1 process, generated 64x64 clips: {rate:.2f} clips/s")
        for batch_size, batches in [(32, 20), (256, 4)]:
            rate = loader_rate(work / "ds", batch_size, batches)
            print(f"loader, training augmentations, batch {batch_size}: {rate:.0f} clips/s")


if __name__ == "__main__":
    main()
