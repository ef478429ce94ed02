"""Ahead-of-time check of a recipe on a mesh: compile its full-size training step, allocate nothing.

Before a long run, this builds the run through the trainers' own setup (``train/setup.py``,
abstractly: no data read, no parameter allocated), lowers and compiles the exact sharded step
(model, optimizer, accumulation, extra state, mesh, sharding rules, global batch), then prints
the per-device memory the compiled program needs (state + batch, temporaries) and its FLOPs
(analytic: XLA's own count sees a scanned layer once). On the target host it checks the real
devices; on a CPU it can stand in for N devices (``--devices``) to catch sharding mistakes
(indivisible batch, mesh that does not fit) before you get a pod. Every trainer is covered:

    python launch/aot_check.py configs/pretrain.py:as-scale++ --devices 8 --config.mesh.fsdp=4 \\
        --config.sharding=fsdp
    python launch/aot_check.py configs/pcav.py:as,tiny --devices 8
    python launch/aot_check.py configs/finetune.py:as20k          # on the GPU/TPU host itself
"""

from __future__ import annotations

import argparse
import json
import os
import sys

NOMINAL_CLIPS = 100_000  # durations do not change shapes: any dataset size compiles the same


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="config file[:variant]")
    parser.add_argument("--devices", type=int, help="stand in for N devices on this CPU")
    args, overrides = parser.parse_known_args(argv)
    if args.devices:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.devices}"
        )
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from cavmae_jax.config_loading import apply_overrides, load_config
    from cavmae_jax.train.setup import abstract_batch, build

    config = load_config(args.config)
    apply_overrides(config, overrides)
    setup = build(config, abstract_clips=NOMINAL_CLIPS)
    step = setup.step_at(1)
    compiled = step.lower(setup.state, abstract_batch(config, setup)).compile()
    memory = compiled.memory_analysis()
    gib = 2.0**30
    report = {
        "trainer": config.trainer,
        "backend": jax.default_backend(),
        "mesh": dict(setup.mesh.shape),
        "global_batch": config.batch_size,
        "grad_accum": config.grad_accum,
        "attention": setup.cfg.attention,
        "arguments_gib_per_device": round(memory.argument_size_in_bytes / gib, 3),
        "temporaries_gib_per_device": round(memory.temp_size_in_bytes / gib, 3),
        "outputs_gib_per_device": round(memory.output_size_in_bytes / gib, 3),
        # analytic count
        "tflop_per_step_per_device": round(
            setup.clip_flops * config.batch_size / setup.mesh.size / 1e12, 3
        ),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
