"""The traffic model of ``cavmae_jax/hlo_stats.py`` against XLA's own ``bytes accessed``.

XLA counts a loop body once, so the two can only be compared on programs without loops: each
recipe's step at full width with one layer per stack (the scans then vanish), compiled for a
TPU slice on this machine (libtpu, compile only). Prints, per program, our figure (every
buffer, at its tiled size), XLA's, their ratio, and our figure for HBM-resident buffers only.

    python bench/traffic_validation.py            # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))

PROGRAMS = {  # recipe -> model fields that leave one layer per stack
    "configs/pretrain.py:as-base": dict(depth=2, modality_specific_depth=1, decoder_depth=1),
    "configs/finetune.py:as2m": dict(depth=2, modality_specific_depth=1),
}
GIB = 2.0**30


def measure(recipe: str, layers: dict, topology: str, batch: int) -> dict:
    from cavmae_jax import hlo_stats, tpu
    from cavmae_jax.config_loading import load_config
    from cavmae_jax.train.setup import abstract_batch, build

    config = load_config(recipe)
    with config.unlocked():
        config.model.update(layers)
        config.batch_size = batch
    setup, state = build(config, abstract_clips=100_000, devices=tpu.devices(tpu.parse(topology)))
    compiled = setup.step_at(1).lower(state, abstract_batch(config, setup)).compile()
    text = compiled.as_text()
    stats = hlo_stats.analyze(text)
    loops = sum(i.op == "while" for c in hlo_stats.parse(text)[0].values() for i in c)
    xla = compiled.cost_analysis()["bytes accessed"]
    return {
        "recipe": recipe,
        "layers": layers,
        "topology": topology,
        "batch": batch,
        "loops": loops,  # 0: XLA's figure counts every instruction once, as ours does
        "ours_gib": round(stats.bytes_accessed / GIB, 3),
        "xla_gib": round(xla / GIB, 3),
        "ratio": round(stats.bytes_accessed / xla, 3),
        "hbm_only_gib": round(stats.hbm_bytes / GIB, 3),
        "async_copy_gib": round(stats.async_copy_bytes / GIB, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5e-4")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    import aot_check

    from cavmae_jax import tpu

    aot_check._compile_only_environment(tpu.parse(args.topology))
    for recipe, layers in PROGRAMS.items():
        print(json.dumps(measure(recipe, layers, args.topology, args.batch)), flush=True)


if __name__ == "__main__":
    main()
