"""Full-size (ViT-B) CAV-MAE speed on this machine: jitted pretraining step and inference forward.

Prints, per mode / dtype / batch size: compile time, seconds per step, clips/s, achieved GFLOP/s
(analytic count, ``cavmae_jax/flops.py``), the fraction of this machine's matmul peak measured in
the same run, and the peak resident memory of the process that ran it (each configuration runs in
its own subprocess so that peaks do not mix).

    python bench/model_throughput.py            # everything (about 20 minutes on 2 cores)
    python bench/model_throughput.py --modes train --dtypes float32 --batches 2 4
    python bench/model_throughput.py --modes train infer --batches 2 4 --against-torch 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def matmul_peak_gflops(repeats: int = 5) -> float:
    """Best float32 matmul rate over a few square and ViT-shaped products."""
    best = 0.0
    for m, k, n in [(2048, 2048, 2048), (2832, 512, 2048), (708, 768, 3072)]:
        a = jnp.ones((m, k), jnp.float32)
        b = jnp.ones((k, n), jnp.float32)
        f = jax.jit(jnp.dot)
        f(a, b).block_until_ready()
        for _ in range(repeats):
            start = time.perf_counter()
            f(a, b).block_until_ready()
            best = max(best, 2 * m * k * n / (time.perf_counter() - start) / 1e9)
    return best


def full_size_pretraining(dtype: str, batch: int):
    """Full-size CAV-MAE (norm_pix_loss), official Adam, the trainers' jitted step and a random
    batch. Returns (cfg, graphdef, params, rest, train state, step, batch dict)."""
    from flax import nnx

    from cavmae_jax.models import CAVMAE, ModelConfig
    from cavmae_jax.train.optim import official_adam
    from cavmae_jax.train.pretrain import pretrain_loss
    from cavmae_jax.train.steps import make_train_step

    cfg = ModelConfig(dtype=dtype, norm_pix_loss=True)
    graphdef, params, rest = nnx.split(CAVMAE(cfg, nnx.Rngs(0)), nnx.Param, ...)
    tx = official_adam(1e-4)
    masks = dict(mask_ratio_a=0.75, mask_ratio_v=0.75, mask_mode="unstructured")
    step = make_train_step(pretrain_loss(graphdef, masks), tx, lambda count: 1e-4, seed=0)
    rng = np.random.default_rng(0)
    data = {
        "audio": rng.standard_normal((batch, cfg.audio_length, cfg.num_mel_bins), np.float32),
        "image": rng.standard_normal((batch, cfg.img_size, cfg.img_size, 3), np.float32),
    }
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "rest": rest,
        "opt_state": tx.init(params),
    }
    return cfg, graphdef, params, rest, state, step, data


def run_one(mode: str, dtype: str, batch: int, steps: int) -> dict:
    """Compile and time one configuration in this process."""
    from flax import nnx

    from cavmae_jax import flops

    cfg, graphdef, params, rest, state, step, batch_data = full_size_pretraining(dtype, batch)
    audio, image = batch_data["audio"], batch_data["image"]
    if mode == "train":
        start = time.perf_counter()
        step = step.compile(state, batch_data)
        compile_s = time.perf_counter() - start

        def call(i):
            nonlocal state
            state, metrics = step(state, batch_data)
            jax.block_until_ready(metrics)

        clip_flops = flops.pretrain_step(cfg)
    else:

        def features(params, rest, a, v):
            return nnx.merge(graphdef, params, rest).forward_feat(a, v)

        start = time.perf_counter()
        compiled = jax.jit(features).lower(params, rest, audio, image).compile()
        compile_s = time.perf_counter() - start

        def call(i):
            jax.block_until_ready(compiled(params, rest, audio, image))

        clip_flops = flops.features_forward(cfg)
    call(0)  # warm-up
    times = []
    for i in range(steps):
        start = time.perf_counter()
        call(i + 1)
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    return dict(
        mode=mode,
        dtype=dtype,
        batch=batch,
        compile_s=compile_s,
        step_s=step_s,
        clips_per_s=batch / step_s,
        gflops=clip_flops * batch / step_s / 1e9,
        peak_mem_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    )


def in_process(command: list[str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def side_by_side(modes: list[str], batches: list[int], steps: int, rounds: int) -> None:
    """JAX (this project) and the PyTorch baseline (``torch_baseline.py``), float32, each
    configuration in a fresh process, alternated ``rounds`` times so that both see the same
    machine; prints the range of each and the ratio of the medians."""
    torch_script = str(Path(__file__).with_name("torch_baseline.py"))
    print(f"{'mode':6} {'batch':>5} {'JAX clips/s':>16} {'PyTorch clips/s':>16} {'ratio':>6}")
    for mode in modes:
        for batch in batches:
            ours, theirs = [], []
            for _ in range(rounds):
                jax_run = [sys.executable, __file__, "--one", mode, "float32", str(batch)]
                ours.append(in_process(jax_run + ["--steps", str(steps)])["clips_per_s"])
                torch_run = [sys.executable, torch_script, "--one", mode, str(batch)]
                theirs.append(in_process(torch_run + ["--steps", str(steps)])["clips_per_s"])
            ratio = np.median(ours) / np.median(theirs)
            print(
                f"{mode:6} {batch:>5} {min(ours):7.3f}-{max(ours):<8.3f} "
                f"{min(theirs):7.3f}-{max(theirs):<8.3f} {ratio:5.2f}x",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["train", "infer"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument(
        "--against-torch",
        type=int,
        metavar="ROUNDS",
        help="float32 only: alternate fresh JAX and PyTorch processes ROUNDS times per batch",
    )
    parser.add_argument(
        "--one", nargs=3, metavar=("MODE", "DTYPE", "BATCH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.one:
        mode, dtype, batch = args.one
        print(json.dumps(run_one(mode, dtype, int(batch), args.steps)))
        return
    if args.against_torch:
        side_by_side(args.modes, args.batches, args.steps, args.against_torch)
        return
    peak = matmul_peak_gflops()
    print(f"devices: {jax.devices()}  jax {jax.__version__}")
    print(f"measured float32 matmul peak: {peak:.1f} GFLOP/s")
    header = f"{'mode':6} {'dtype':9} {'batch':>5} {'compile s':>9} {'step s':>7} "
    print(header + f"{'clips/s':>8} {'GFLOP/s':>8} {'% peak':>7} {'peak GB':>8}")
    for mode in args.modes:
        for dtype in args.dtypes:
            for batch in args.batches:
                cmd = [sys.executable, __file__, "--one", mode, dtype, str(batch)]
                done = subprocess.run(
                    cmd + ["--steps", str(args.steps)], capture_output=True, text=True
                )
                if done.returncode:
                    print(f"{mode:6} {dtype:9} {batch:>5} failed: {done.stderr.strip()[-300:]}")
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                print(
                    f"{mode:6} {dtype:9} {batch:>5} {r['compile_s']:9.1f} {r['step_s']:7.2f} "
                    f"{r['clips_per_s']:8.3f} {r['gflops']:8.1f} {100 * r['gflops'] / peak:6.1f}% "
                    f"{r['peak_mem_gb']:8.2f}",
                    flush=True,
                )
    print("PyTorch on the same machine: python bench/torch_baseline.py")


if __name__ == "__main__":
    main()
