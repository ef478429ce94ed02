"""Input pipeline speed on this machine: ``prepare`` clips/s per process and loader clips/s.

prepare: the two real sample clips (256x144 12.5 fps and 1280x720 30 fps, AAC 44.1 kHz stereo),
each listed ``--repeat`` times, one worker process. Loader: a generated dataset of ``--clips``
clips, training mode (random frame decode, fbank, SpecAugment, mixup, noise + roll), batches of
32 and 256.

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


def loader_rate(data_dir: Path, batch_size: int, batches: int) -> float:
    config = LoaderConfig(
        batch_size=batch_size,
        num_classes=4,
        freqm=48,
        timem=192,
        mixup=0.5,
        label_smooth=0.1,
        noise=True,
        shuffle_buffer=1000,
    )
    stream = iter(Loader(data_dir, "train", config))
    next(stream)  # warm-up: graph building and the first shuffle buffer
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--clips", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, rate in prepare_rate(work, args.repeat):
            print(f"prepare, 1 process, {name}: {rate:.2f} clips/s")
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
