"""The PyTorch bar on this machine: the official CAV-MAE math in PyTorch, full size, same step.

Runs ``tests/torch_reference.py`` (our PyTorch rendering of the official model: Conv2d patches,
timm-style attention, nn.LayerNorm, exact GELU) through the official pretraining step
(masks 0.75/0.75, norm_pix_loss, backward, Adam with coupled L2 over the trainable parameters;
fixed position tables) and prints clips/s, each configuration in a fresh process as the
official scripts run, so that ``model_throughput.py`` can be compared with PyTorch on the same
CPU (``model_throughput.py --against-torch`` alternates the two in one run). Measured side by
side with the official code itself (timm 0.4.5 blocks), alternating fresh processes on this
machine (2026-11-30): official 0.446 / 0.475 clips/s at batch 2 and 0.399 / 0.366 at batch 4,
this baseline 0.448 / 0.477 and 0.461 / 0.384.

    python bench/torch_baseline.py --batches 2 4
    python bench/torch_baseline.py --device cuda --modes train --batches 48   # a GPU host

On a GPU the step runs as the official trainer runs it there: ``torch.cuda.amp.autocast``
(float16) with a ``GradScaler``; peak memory is the CUDA allocator's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import torch_reference as ref  # noqa: E402

from cavmae_jax.models import ModelConfig  # noqa: E402


def run_one(mode: str, batch: int, steps: int, device: str = "cpu", dry_run: bool = False) -> dict:
    """One configuration in this process: a fresh model, as the official scripts run
    (``dry_run``: the model and optimizer built on the CPU, nothing run)."""
    if dry_run:
        device = "cpu"
    cfg = ModelConfig(norm_pix_loss=True)
    torch.manual_seed(0)
    model = ref.CAVMAE(cfg).to(device)
    for table in (
        model.pos_embed_a,
        model.pos_embed_v,
        model.decoder_pos_embed_a,
        model.decoder_pos_embed_v,
    ):
        table.requires_grad_(False)  # fixed sin-cos tables, as the official tr_pos=False
    if mode == "train":
        trainables = [p for p in model.parameters() if p.requires_grad]  # the official optimizer
        opt = torch.optim.Adam(trainables, lr=1e-4, betas=(0.95, 0.999), weight_decay=5e-7)
        if dry_run:
            return dict(mode=mode, batch=batch, trainable=sum(p.numel() for p in trainables))
        step_s = timed_train_step(model, opt, cfg, batch, steps, device)
    else:
        model.eval()
        step_s = timed_features(model, cfg, batch, steps, device)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 1e9
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return dict(
        mode=mode,
        batch=batch,
        step_s=step_s,
        clips_per_s=batch / step_s,
        peak_mem_gb=peak,
        threads=torch.get_num_threads(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["train", "infer"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--one", nargs=2, metavar=("MODE", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--dry-run", action="store_true", help="build the model only, run nothing")
    args = parser.parse_args()
    if args.dry_run:
        for mode in args.modes:
            for batch in args.batches:
                print(json.dumps(run_one(mode, batch, args.steps, args.device, dry_run=True)))
        return
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.steps, args.device)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'mode':6} {'batch':>5} {'step s':>7} {'clips/s':>8} {'peak GB':>8}")
    for mode in args.modes:
        for batch in args.batches:
            r = one_process(mode, batch, args.steps, args.device)
            print(
                f"{mode:6} {batch:>5} {r['step_s']:7.2f} {r['clips_per_s']:8.3f} "
                f"{r['peak_mem_gb']:8.2f}",
                flush=True,
            )


def one_process(mode: str, batch: int, steps: int, device: str = "cpu") -> dict:
    """``run_one`` in a fresh process (no allocator state carried over from other sizes)."""
    command = [sys.executable, __file__, "--one", mode, str(batch), "--steps", str(steps)]
    command += ["--device", device]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_time(fn, steps: int, device: str = "cpu") -> float:
    """Median seconds of ``steps`` calls after one warm-up call (the GPU synchronised)."""

    def call():
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    call()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def timed_train_step(model, opt, cfg, batch: int, steps: int, device: str = "cpu") -> float:
    audio = torch.randn(batch, cfg.audio_length, cfg.num_mel_bins, device=device)
    image = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device)
    scaler = torch.amp.GradScaler("cuda") if device == "cuda" else None

    def step():
        noise_a = torch.rand(batch, 512, device=device)
        noise_v = torch.rand(batch, 196, device=device)
        opt.zero_grad()
        if scaler is None:
            model(audio, image, noise_a, noise_v, 0.75, 0.75)["loss"].backward()
            opt.step()
            return
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(audio, image, noise_a, noise_v, 0.75, 0.75)["loss"]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return median_time(step, steps, device)


def timed_features(model, cfg, batch: int, steps: int, device: str = "cpu") -> float:
    audio = torch.randn(batch, cfg.audio_length, cfg.num_mel_bins, device=device)
    image = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device)

    def features():
        with torch.no_grad(), torch.autocast(device, enabled=device == "cuda"):
            model.feat(audio, image)

    return median_time(features, steps, device)


if __name__ == "__main__":
    main()
