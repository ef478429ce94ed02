"""Run pretraining steps of a tiny CAV-MAE on meshes and print the results as JSON.

Executed in subprocesses by test_sharding.py (the fake CPU devices must be configured before JAX
starts): ``python tests/mesh_worker.py RUNS`` with RUNS a JSON list of
``{"shape": {"data": 2, "fsdp": 4}, "rules": "fsdp", "groups": 1, "steps": 1}``; each run uses
the first devices its mesh needs, and one JSON list of results is printed. With
``CAVMAE_COORDINATOR``, ``CAVMAE_PROCESSES`` and ``CAVMAE_PROCESS_ID`` set, it first joins a
multi-process run with ``jax.distributed.initialize``; each process then supplies its rows of
the same global batch.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.experimental.multihost_utils
import ml_collections
import numpy as np
import optax
from worker_env import join_from_env

from cavmae_jax import sharding
from cavmae_jax.models import tiny
from cavmae_jax.train.pretrain import CAVMAEPretraining, whole_batch_pretrain_loss
from cavmae_jax.train.setup import initial_state
from cavmae_jax.train.steps import make_train_step


def gathered(x: jax.Array) -> np.ndarray:
    """The whole array on every process, float64."""
    full = jax.experimental.multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(full).astype(np.float64)


def run(shape: dict, rules: str, groups: int = 1, steps: int = 1, accum: int = 1) -> dict:
    """``steps`` SGD steps on a fixed batch of 8 clips over a mesh of ``shape``, from the
    state and with the loss the trainer's own setup creates (the contrastive term over the
    whole batch of ``accum`` micro-batches)."""
    size = int(np.prod(list(shape.values())))
    mesh = sharding.make_mesh(shape, jax.devices()[:size])
    cfg = tiny(embed_dim=32, num_heads=4, loss_groups=groups, norm_pix_loss=True)
    # SGD: Adam's first step is sign(g) and would amplify rounding in near-zero gradients
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.5, momentum=0.9))
    config = ml_collections.ConfigDict({"sharding": rules, "seed": 0, "init": ""})
    graphdef, state, shardings, _ = initial_state(
        CAVMAEPretraining(), config, cfg, mesh, lambda params: tx, abstract=False
    )
    masks = dict(mask_ratio_a=0.75, mask_ratio_v=0.75, mask_mode="unstructured")
    step = make_train_step(
        whole_batch_pretrain_loss(graphdef, cfg, masks),
        tx,
        lambda count: 0.5,
        seed=0,
        grad_accum=accum,
        state_shardings=shardings,
        mesh=mesh,
    )
    rng = np.random.default_rng(0)
    batch = {
        "audio": rng.standard_normal((8, cfg.audio_length, cfg.num_mel_bins), np.float32),
        "image": rng.standard_normal((8, cfg.img_size, cfg.img_size, 3), np.float32),
    }
    rows = slice(
        jax.process_index() * 8 // jax.process_count(),
        (jax.process_index() + 1) * 8 // jax.process_count(),
    )
    local = {name: value[rows] for name, value in batch.items()}
    for _ in range(steps):
        state, metrics = step(state, sharding.global_batch(local, mesh))
    params, opt_state = state["params"], state["opt_state"]
    kernel = params["blocks_a"]["layers"]["mlp"]["fc1"]["kernel"]
    return {
        "devices": size,
        "loss": float(metrics["loss"]),
        "loss_c": float(metrics["loss_c"]),
        "params": [float(gathered(x).sum()) for x in jax.tree.leaves(params)],
        "kernel_spec": str(kernel[...].sharding.spec),
        "moment_spec": [
            str(x.sharding.spec) for x in jax.tree.leaves(opt_state) if x.shape == kernel.shape
        ][0],
    }


if __name__ == "__main__":
    join_from_env()
    print(json.dumps([run(**spec) for spec in json.loads(sys.argv[1])]))
