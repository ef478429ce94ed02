"""The PyTorch bar on this machine: the official CAV-MAE math in PyTorch, full size, same step.

Runs ``tests/torch_reference.py`` (our PyTorch rendering of the official model: Conv2d patches,
timm-style attention, nn.LayerNorm, exact GELU) through the official pretraining step
(masks 0.75/0.75, norm_pix_loss, backward, Adam with coupled L2) and prints clips/s, so that
``model_throughput.py`` can be compared with PyTorch on the same CPU.

    python bench/torch_baseline.py --batches 2 4
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import torch_reference as ref  # noqa: E402

from cavmae_jax.models import ModelConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    cfg = ModelConfig(norm_pix_loss=True)
    torch.manual_seed(0)
    model = ref.CAVMAE(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=5e-7)
    print(f"{'mode':6} {'batch':>5} {'step s':>7} {'clips/s':>8} {'peak GB':>8}")
    for batch in args.batches:
        report("train", batch, timed_train_step(model, opt, cfg, batch, args.steps))
    model.eval()
    for batch in args.batches:
        report("infer", batch, timed_features(model, cfg, batch, args.steps))


def report(mode: str, batch: int, step_s: float) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"{mode:6} {batch:>5} {step_s:7.2f} {batch / step_s:8.3f} {peak:8.2f}", flush=True)


def median_time(fn, steps: int) -> float:
    """Median seconds of ``steps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def timed_train_step(model, opt, cfg, batch: int, steps: int) -> float:
    audio = torch.randn(batch, cfg.audio_length, cfg.num_mel_bins)
    image = torch.randn(batch, 3, cfg.img_size, cfg.img_size)

    def step():
        noise_a, noise_v = torch.rand(batch, 512), torch.rand(batch, 196)
        opt.zero_grad()
        model(audio, image, noise_a, noise_v, 0.75, 0.75)["loss"].backward()
        opt.step()

    return median_time(step, steps)


def timed_features(model, cfg, batch: int, steps: int) -> float:
    audio = torch.randn(batch, cfg.audio_length, cfg.num_mel_bins)
    image = torch.randn(batch, 3, cfg.img_size, cfg.img_size)

    def features():
        with torch.no_grad():
            model.feat(audio, image)

    return median_time(features, steps)


if __name__ == "__main__":
    main()
