"""Evaluate a small CAVMAEFT, a PCAV-MAE memory bank and its retrieval recall on a mesh, and run
``embed`` and ``classify`` on the dataset's videos over all devices; print the results as JSON.

Executed in subprocesses by test_finetune.py (fake CPU devices must be set before JAX starts):
``python tests/eval_worker.py DATA_DIR GLOBAL_BATCH [DEVICES ...]``: one result per mesh over the
first DEVICES devices (default: all), printed as one JSON list. With ``CAVMAE_COORDINATOR``,
``CAVMAE_PROCESSES`` and ``CAVMAE_PROCESS_ID`` it first joins a multi-process run. The videos
are the ``videos`` folder beside DATA_DIR.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from worker_env import join_from_env

from cavmae_jax import prototypes, retrieval
from cavmae_jax.classify import classify
from cavmae_jax.embed import embed
from cavmae_jax.evaluators import Classification
from cavmae_jax.inference import replicated_state, split_bank, split_embeddings
from cavmae_jax.models import CAVMAEFT, ModelConfig
from cavmae_jax.models.pcav_mae import PCAVMAE, pcav_config
from cavmae_jax.sharding import make_mesh

SMALL = ModelConfig(embed_dim=32, depth=2, modality_specific_depth=1, num_heads=2, label_dim=4)
SMALL_PCAV = pcav_config(
    embed_dim=32,
    depth=2,
    modality_specific_depth=1,
    num_heads=2,
    decoder_embed_dim=16,
    decoder_depth=1,
    decoder_num_heads=2,
)


def evaluate(data_dir: str, batch_size: int, devices: int) -> dict:
    """Logits, memory bank and prototypes of every clip on a mesh over ``devices`` devices."""
    mesh = make_mesh({"data": -1}, jax.devices()[:devices])
    graphdef, state = replicated_state(CAVMAEFT(SMALL, nnx.Rngs(0)), mesh)
    evaluator = Classification(
        graphdef, mesh, data_dir, "train", batch_size, SMALL.label_dim, "multimodal"
    )
    out = evaluator.outputs(state)
    # labels travel with their logits
    result = {
        "devices": devices,
        "logits": out["logits"].tolist(),
        "label": out["label"].argmax(1).tolist(),
    }
    # the per-epoch validation: full global batches only, in the split's order
    validation = Classification(
        graphdef,
        mesh,
        data_dir,
        "train",
        batch_size,
        SMALL.label_dim,
        "multimodal",
        drop_last=True,
    )
    result["validation"] = validation.outputs(state)["logits"].tolist()
    # PCAV-MAE's memory bank (batched the same way) and the prototypes found on it
    graphdef, state = replicated_state(PCAVMAE(SMALL_PCAV, nnx.Rngs(0)), mesh)
    bank = split_embeddings(
        graphdef, mesh, data_dir, "train", batch_size, state["params"], state["rest"]
    )
    # the refresh's bank: each host keeps the rows it embedded, split over the devices
    split = split_bank(
        graphdef, mesh, data_dir, "train", batch_size, state["params"], state["rest"]
    )
    arrays, levels = prototypes.discover(split, "density", (3,), 8, chunk=4)  # several chunks
    _, (kmeans,) = prototypes.discover(split, "kmeans", (3,), 8, chunk=4)
    result.update(
        audio=bank["audio"].tolist(),
        visual=bank["visual"].tolist(),
        gamma=arrays["gamma"].tolist(),
        sizes=levels[0]["sizes"].tolist() + kmeans["sizes"].tolist(),
        prototype_clips=[levels[0]["clips"].tolist(), kmeans["clips"].tolist()],
        clip_labels=[levels[0]["labels"].tolist(), kmeans["labels"].tolist()],
        bank_rows=[
            split.audio.shape[0],
            max(s.data.shape[0] for s in split.audio.addressable_shards),
        ],
        # blocks of 5 queries: a short last block, candidates padded over the devices
        recall=retrieval.recall(bank["audio"], bank["visual"], mesh, block=5),
    )
    return result


def commands(data_dir: str, batch_size: int) -> dict:
    """``classify`` (every process gets every clip's result) and ``embed`` (process 0 writes
    the files) of the videos beside the dataset, and ``embed`` of the dataset itself."""
    videos = str(Path(data_dir).parent / "videos")
    model = CAVMAEFT(SMALL, nnx.Rngs(0))
    found = classify(model, [videos], "multimodal", "bce", top_k=2, batch_size=batch_size)
    result = {"classify": [[r["path"], r["logits"]] for r in found]}
    for name, inputs in (("videos", [videos]), ("dataset", [data_dir])):
        output = Path(tempfile.mkdtemp())
        embed(model, inputs, output, batch_size, split="train")
        if jax.process_index() == 0:
            ids = (output / "ids.txt").read_text().split()
            result[f"embed_{name}"] = [ids, np.load(output / "joint.npy").tolist()]
    return result


if __name__ == "__main__":
    join_from_env()
    data, batch = sys.argv[1], int(sys.argv[2])
    counts = [int(n) for n in sys.argv[3:]] or [len(jax.devices())]
    results = [evaluate(data, batch, n) for n in counts]
    results[0].update(commands(data, batch))
    print(json.dumps(results))
