"""Attention implementations side by side on the full-size (ViT-B) pretraining step.

For each implementation the platform offers (``xla``, ``recompute``; ``cudnn`` on NVIDIA GPUs),
the trainers' step (``train/steps.py``, official Adam, masks 0.75 / 0.75, norm_pix_loss) is
compiled and run on the same batch from the same parameters. Printed per implementation:
compile seconds, the compiled program's temporary memory (``memory_analysis``), median step
seconds, clips/s, and the first update's loss (the implementations must agree on it). With
``--accum K`` the same global batch also runs as K micro-batches (same update, less memory).

    python bench/attention_backends.py --batch 48 --dtype bfloat16      # on a GPU host
    python bench/attention_backends.py --batch 2 --dtype float32 --steps 2   # this CPU
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def run(attention: str, dtype: str, batch: int, accum: int, steps: int) -> dict:
    from flax import nnx

    from cavmae_jax import flops
    from cavmae_jax.models import CAVMAE, ModelConfig
    from cavmae_jax.train.optim import official_adam
    from cavmae_jax.train.pretrain import pretrain_loss
    from cavmae_jax.train.steps import make_train_step

    cfg = ModelConfig(dtype=dtype, norm_pix_loss=True, attention=attention)
    graphdef, params, rest = nnx.split(CAVMAE(cfg, nnx.Rngs(0)), nnx.Param, ...)
    tx = official_adam(1e-4)
    masks = dict(mask_ratio_a=0.75, mask_ratio_v=0.75, mask_mode="unstructured")
    step = make_train_step(
        pretrain_loss(graphdef, masks), tx, lambda count: 1e-4, seed=0, grad_accum=accum
    )
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "rest": rest,
        "opt_state": tx.init(params),
    }
    rng = np.random.default_rng(0)
    data = {
        "audio": jnp.asarray(rng.standard_normal((batch, 1024, 128), np.float32)),
        "image": jnp.asarray(rng.standard_normal((batch, 224, 224, 3), np.float32)),
    }
    start = time.perf_counter()
    step = step.compile(state, data)
    compile_s = time.perf_counter() - start
    temp_gib = step.jitted.memory_analysis().temp_size_in_bytes / 2**30
    state, metrics = step(state, data)
    first_loss = float(metrics["loss"])
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    tflops = flops.pretrain_step(cfg) * batch / step_s / 1e12
    return dict(
        attention=attention,
        dtype=dtype,
        batch=batch,
        accum=accum,
        compile_s=round(compile_s, 1),
        temp_gib=round(temp_gib, 2),
        step_s=round(step_s, 4),
        clips_per_s=round(batch / step_s, 2),
        tflops=round(tflops, 1),
        first_loss=first_loss,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--accum", type=int, default=1, help="also run K micro-batches")
    parser.add_argument("--implementations", nargs="+")
    args = parser.parse_args()
    platform = jax.devices()[0].platform
    names = args.implementations or (
        ["xla", "cudnn", "recompute"] if platform == "gpu" else ["xla", "recompute"]
    )
    print(f"devices: {jax.devices()}  jax {jax.__version__}")
    runs = [(name, 1) for name in names]
    if args.accum > 1:
        runs.append((names[0], args.accum))
    for name, accum in runs:
        try:
            print(json.dumps(run(name, args.dtype, args.batch, accum, args.steps)), flush=True)
        except Exception as error:  # one implementation failing must not hide the others
            print(json.dumps({"attention": name, "accum": accum, "error": str(error)[:500]}))


if __name__ == "__main__":
    main()
