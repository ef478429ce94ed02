"""Overhead of the training loop at full size (ViT-B): the real trainer vs the bare jitted step.

For pretraining and finetuning, on generated full-size clips (1024 x 128 fbank, 224 x 224
frames) prepared once under ``--data``:
  * bare: the same jitted, sharded step on one batch already on the device, timed alone;
  * trainer: ``cavmae_jax.train.loop.train`` as ``cavmae pretrain`` / ``finetune`` run it: tf.data
    loader with the recipe's augmentations, host batch -> global array, step, metrics logged
    (and a device sync) every step, checkpoints, progress bar. Its rate is the median of the
    logged clips/s after the warm-up steps.
The overhead is 1 - trainer / bare; it must stay under 5%.

    python bench/train_throughput.py                 # batch 4, 6 timed steps each (~6 min)
    python bench/train_throughput.py --batch 8 --steps 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax

from cavmae_jax import sharding
from cavmae_jax.config_loading import load_config
from cavmae_jax.train.loop import train
from cavmae_jax.train.setup import build

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 2  # logged steps left out: compilation and loader start-up


def full_size_config(kind: str, data_dir: Path, batch: int, steps: int):
    """The official recipe at full size in float32 (this CPU), with short run settings."""
    name = "pretrain.py:as-base" if kind == "pretrain" else "finetune.py:as20k"
    config = load_config(str(ROOT / "configs" / name))
    config.model.dtype = "float32"
    config.data.update(
        dir=str(data_dir),
        classes=config.model.label_dim if kind != "pretrain" else config.data.classes,
    )
    if kind != "pretrain":
        config.data.update(eval_dir=str(data_dir), eval_split="train", balanced=False)
        config.data.mixup_approx = True  # the generated clips keep no waveform
        config.evals = {}  # no epoch ends in this run
    config.batch_size = batch
    config.num_steps = WARMUP + steps
    config.log_every = 1
    config.checkpoint_every = 10_000  # one save, at the end
    config.peak_tflops = 0.48
    return config


def bare_rate(setup, state: dict, batch: int, steps: int) -> tuple[float, dict]:
    """clips/s of the jitted step alone, repeated on one device-resident batch, and the state
    it leaves."""
    stream = setup.batches_from(0)
    local = next(stream)
    del stream  # stops the loader's prefetching threads: the bare step runs alone
    data = sharding.global_batch({k: local[k] for k in setup.trainer.batch_keys}, setup.mesh)
    for i in range(WARMUP + steps):
        if i == WARMUP:
            start = time.perf_counter()
        state, metrics = setup.step_at(i + 1)(state, data)
        jax.block_until_ready(metrics)
    return steps * batch / (time.perf_counter() - start), state


def measure(kind: str, data_dir: Path, batch: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        config = full_size_config(kind, data_dir, batch, steps)
        setup, state = build(config, workdir)
        bare, state = bare_rate(setup, state, batch, steps)
        train(setup, state, workdir)
        rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    trainer = statistics.median(r["clips_per_s"] for r in rows[WARMUP:])
    return {
        "kind": kind,
        "batch": batch,
        "bare_clips_per_s": round(bare, 4),
        "trainer_clips_per_s": round(trainer, 4),
        "overhead": round(1 - trainer / bare, 4),
    }


def prepared_data(root: Path, clips: int) -> Path:
    from input_pipeline import prepare, synthetic

    data_dir = root / "dataset"
    if not (data_dir / "dataset_info.json").exists():
        videos = synthetic.generate(root / "videos", clips=clips, classes=8, seed=0)
        prepare.prepare(videos, data_dir, labels=root / "videos" / "labels.csv", workers=2)
    return data_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--data", default="workdir/bench-data", help="generated clips (cached)")
    parser.add_argument("--kinds", nargs="+", default=["pretrain", "finetune"])
    args = parser.parse_args()
    # more clips than the run reads: no epoch ends (finetuning would validate there)
    data_dir = prepared_data(Path(args.data), clips=max(64, 2 * (WARMUP + args.steps) * args.batch))
    print(f"devices: {jax.devices()}")
    for kind in args.kinds:
        result = measure(kind, data_dir, args.batch, args.steps)
        print(json.dumps(result))
        print(
            f"{kind}: bare step {result['bare_clips_per_s']:.3f} clips/s, trainer "
            f"{result['trainer_clips_per_s']:.3f} clips/s, loop overhead "
            f"{100 * result['overhead']:.1f}% (must be < 5%)"
        )


if __name__ == "__main__":
    main()
