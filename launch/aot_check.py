"""Ahead-of-time check of a recipe on a mesh: compile its full-size training step, allocate nothing.

Before a long run, this lowers and compiles the exact sharded step of a config (model, optimizer,
mesh, sharding rules, global batch) from abstract shapes, then prints the per-device memory the
compiled program needs (parameters + optimizer state + batch, temporaries) and its FLOPs
(analytic: XLA's own count sees a scanned layer once). On the target host it checks the real
devices; on a CPU it can stand in for N devices (``--devices``) to catch sharding mistakes
(indivisible batch, mesh that does not fit) before you get a pod.

    python launch/aot_check.py configs/pretrain.py:as-scale++ --devices 8 --config.mesh.fsdp=4 \\
        --config.sharding=fsdp
    python launch/aot_check.py configs/finetune.py:as20k          # on the GPU/TPU host itself
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def abstract_step(config):
    """(jitted step, abstract arguments) of the config's training step on its mesh."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from cavmae_jax import flops
    from cavmae_jax.models import CAVMAE, CAVMAEFT, ModelConfig
    from cavmae_jax.train import sharding
    from cavmae_jax.train.loop import learning_rate
    from cavmae_jax.train.optim import make_optimizer
    from cavmae_jax.train.steps import make_finetune_step, make_pretrain_step

    finetuning = "mode" in config
    cfg = ModelConfig(**config.model.to_dict())
    mesh = sharding.make_mesh(config.mesh.to_dict())
    sharding.check_batch_size(config.batch_size, mesh)
    rules = sharding.RULES[config.sharding]
    kind = CAVMAEFT if finetuning else CAVMAE
    graphdef, params, rest = nnx.split(
        nnx.eval_shape(lambda: kind(cfg, nnx.Rngs(0))), nnx.Param, ...
    )
    param_shardings = sharding.state_shardings(params, mesh, rules)
    options = dict(head_lr=config.head_lr, freeze_base=config.freeze_base) if finetuning else {}
    tx = make_optimizer(learning_rate(config, 1000), params, config.optimizer,
                        config.weight_decay, clip_norm=config.clip_norm,
                        accumulate=config.grad_accum, **options)  # fmt: skip
    opt_shardings = sharding.optimizer_shardings(tx, params, param_shardings)
    replicated = NamedSharding(mesh, PartitionSpec())

    def placed(tree, shardings):
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
        )

    batch_sharding = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))
    b = config.batch_size
    batch = {
        "audio": jax.ShapeDtypeStruct((b, cfg.audio_length, cfg.num_mel_bins), "float32",
                                      sharding=batch_sharding),
        "image": jax.ShapeDtypeStruct((b, cfg.img_size, cfg.img_size, 3), "float32",
                                      sharding=batch_sharding),
    }  # fmt: skip
    shardings = (param_shardings, opt_shardings)
    if finetuning:
        batch["label"] = jax.ShapeDtypeStruct(
            (b, cfg.label_dim), "float32", sharding=batch_sharding
        )
        step = make_finetune_step(graphdef, tx, config.mode, config.loss, shardings)
    else:
        masks = dict(mask_ratio_a=config.mask_ratio_a, mask_ratio_v=config.mask_ratio_v,
                     mask_mode=config.mask_mode)  # fmt: skip
        step = make_pretrain_step(graphdef, tx, masks, shardings)
    args = (
        placed(params, param_shardings),
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), rest),
        placed(jax.eval_shape(tx.init, params), opt_shardings),
        batch,
        jax.eval_shape(lambda: jax.random.key(0)),
    )
    clip_flops = flops.finetune_step(cfg, config.mode) if finetuning else flops.pretrain_step(
        cfg, config.mask_ratio_a, config.mask_ratio_v)  # fmt: skip
    return step, args, mesh, clip_flops * b / mesh.size


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

    config = load_config(args.config)
    apply_overrides(config, overrides)
    step, step_args, mesh, device_flops = abstract_step(config)
    compiled = step.lower(*step_args).compile()
    memory = compiled.memory_analysis()
    gib = 2.0**30
    report = {
        "backend": jax.default_backend(),
        "mesh": dict(mesh.shape),
        "global_batch": config.batch_size,
        "arguments_gib_per_device": round(memory.argument_size_in_bytes / gib, 3),
        "temporaries_gib_per_device": round(memory.temp_size_in_bytes / gib, 3),
        "outputs_gib_per_device": round(memory.output_size_in_bytes / gib, 3),
        "tflop_per_step_per_device": round(device_flops / 1e12, 3),  # analytic count
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
