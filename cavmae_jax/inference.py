"""Batched inference on the mesh: host batches in, every host's outputs gathered, in order. The
host batches come from a prepared split (``predict_split``) or from video files and folders
(``predict_inputs``, which also takes one prepared dataset).

Evaluation must see every clip while a sharded step needs full, equal batches on every host: a
short last batch is padded and hosts with fewer batches feed padding batches; a ``valid`` mask
travels with the batch and padded rows are dropped after the gather. Each row also carries its
clip's position in the split, so that the outputs come back in the split's order and the
official per-epoch validation's "full batches only" drops the same clips for any host count.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cavmae_jax import clip_inputs, prototypes
from cavmae_jax.errors import UserError
from cavmae_jax.sharding import BATCH_AXES, global_batch

EVAL_FRAME = 5  # the official evaluation's frame of the 10 (``frame_use``)


def replicated_state(model, mesh: Mesh) -> tuple:
    """(graphdef, ``{"params", "rest"}`` replicated on ``mesh``) of a loaded model: the state
    evaluators run on outside training."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = jax.device_put((params, rest), NamedSharding(mesh, PartitionSpec()))
    return graphdef, {"params": params, "rest": rest}


def batches_per_host(total: int, local_batch: int) -> int:
    """Batches every host runs over a split of ``total`` clips shared between the hosts (the
    last ones padded)."""
    return math.ceil(math.ceil(total / jax.process_count()) / local_batch)


def _padded(
    batches: Iterable[Mapping[str, np.ndarray]],
    keys,
    local_batch: int,
    count: int,
    template: Mapping[str, np.ndarray] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Exactly ``count`` batches of ``local_batch`` rows with a ``valid`` mask; short or missing
    batches are zero-padded (shapes taken from the first batch, or from ``template``)."""
    iterator = iter(batches)
    for _ in range(count):
        local = next(iterator, None)
        if local is not None:
            template = {k: np.asarray(local[k]) for k in keys}
            rows = len(template[keys[0]])
        else:
            rows = 0
        if template is None:
            raise ValueError("no batch to evaluate: the split is empty")
        out = {}
        for k in keys:
            value = template[k] if rows else template[k][:0]
            pad = np.zeros((local_batch - rows, *value.shape[1:]), value.dtype)
            out[k] = np.concatenate([value, pad])
        out["valid"] = np.arange(local_batch) < rows
        yield out


def gather_outputs(
    apply: Callable[[dict], Mapping[str, jax.Array]],
    batches: Iterable[Mapping[str, np.ndarray]],
    mesh: Mesh,
    local_batch: int,
    count: int,
    keys=("audio", "image", "label"),
    template: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Run ``apply(global batch) -> {name: [B, ...]}`` over ``count`` padded host batches and
    return every output, plus the batch's ``label`` (and ``position``), for the valid rows of
    all hosts. ``template``: arrays of the batch's row shapes, for a host that may have no
    batch at all."""
    collected: dict[str, list[np.ndarray]] = {}
    for local in _padded(batches, list(keys), local_batch, count, template):
        batch = global_batch(local, mesh)
        outputs = dict(apply(batch))
        carried = {k: batch[k] for k in ("label", "position") if k in batch}
        outputs.update(valid=batch["valid"], **carried)
        gathered = multihost_utils.process_allgather(outputs, tiled=True)
        valid = np.asarray(gathered.pop("valid"), bool)
        for name, value in gathered.items():
            collected.setdefault(name, []).append(np.asarray(value)[valid])
    return {name: np.concatenate(parts) for name, parts in collected.items()}


def predict_split(
    apply: Callable[[dict], Mapping[str, jax.Array]],
    mesh: Mesh,
    data_dir,
    split: str,
    batch_size: int,
    frame: int = EVAL_FRAME,
    drop_last: bool = False,
    num_classes: int = 1,
    keys=("audio", "image", "label"),
    all_frames: bool = False,
    norm: tuple[float, float] | None = None,
) -> dict[str, np.ndarray]:
    """``apply`` over every clip of a prepared split (evaluation view: no augmentation, frame
    ``frame``, or all 10 frames [B, 10, ...] with ``all_frames``), global batch ``batch_size``
    split over the hosts and the mesh; with ``drop_last`` only the clips of the split's full
    global batches, as the official per-epoch validation (the same clips for any host count).
    Outputs come in the split's order; ``norm``: the fbank's (mean, std), AudioSet's by
    default. The one inference path of classification, retrieval,
    the PCAV-MAE memory bank, explanations, ``embed`` and ``classify``."""
    batches, local_batch, count, total = _split_batches(
        data_dir, split, batch_size, frame, num_classes, all_frames, norm
    )
    out = gather_outputs(apply, batches, mesh, local_batch, count, (*keys, "position"))
    position = out.pop("position")
    order = np.argsort(position, kind="stable")
    if drop_last:
        order = order[position[order] < total // batch_size * batch_size]
    return {name: value[order] for name, value in out.items()}


def _split_batches(
    data_dir,
    split: str,
    batch_size: int,
    frame: int = EVAL_FRAME,
    num_classes: int = 1,
    all_frames: bool = False,
    norm: tuple[float, float] | None = None,
) -> tuple[Iterator[dict], int, int, int]:
    """This host's evaluation batches of a split, with their rows' ``position`` in it, the
    host's batch size, the number of batches every host runs and the split's clip count."""
    from input_pipeline.dataset import Loader, LoaderConfig

    if batch_size % jax.process_count():
        raise UserError(f"batch {batch_size} does not split over {jax.process_count()} hosts")
    local_batch = batch_size // jax.process_count()
    config = LoaderConfig(
        batch_size=local_batch,
        num_classes=num_classes,
        train=False,
        frame=frame,
        all_frames=all_frames,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        **({"mean": norm[0], "std": norm[1]} if norm else {}),
    )
    loader = Loader(data_dir, split, config)
    total = loader.split_examples
    count = batches_per_host(total, local_batch)
    return _with_positions(loader, loader.first_position), local_batch, count, total


def _with_positions(batches: Iterable[Mapping], first: int) -> Iterator[dict]:
    """Each batch with its rows' positions in the split (this host's share starts at
    ``first``)."""
    for batch in batches:
        rows = len(next(iter(batch.values())))
        yield {**batch, "position": np.arange(first, first + rows)}
        first += rows


@functools.cache
def _embedder(graphdef: nnx.GraphDef) -> Callable:
    """Jitted ``(params, rest, batch) -> {"audio", "visual"}``: PCAV-MAE embeddings (one
    compiled function per model, reused by every memory-bank refresh)."""

    @jax.jit
    def embed(params, rest, batch):
        audio, visual = nnx.merge(graphdef, params, rest).clip_embeddings(
            batch["audio"], batch["image"]
        )
        return {"audio": audio, "visual": visual}

    return embed


def embedding_program(graphdef: nnx.GraphDef, state: dict, batch: dict):
    """The memory bank's embedding of one batch, lowered from the abstract momentum encoder
    (``state["ema"]``) and batch (ahead-of-time checks)."""
    inputs = {k: batch[k] for k in ("audio", "image")}
    return _embedder(graphdef).lower(state["ema"], state["rest"], inputs)


def split_embeddings(
    graphdef: nnx.GraphDef,
    mesh: Mesh,
    data_dir,
    split: str,
    batch_size: int,
    params,
    rest,
    norm: tuple[float, float] | None = None,
) -> dict[str, np.ndarray]:
    """PCAV-MAE embeddings ``audio``, ``visual`` [N, D] of every clip of a split."""
    embed = _embedder(graphdef)
    return predict_split(
        lambda batch: embed(params, rest, batch),
        mesh,
        data_dir,
        split,
        batch_size,
        keys=("audio", "image"),
        norm=norm,
    )


@functools.cache
def _split_by_rows(mesh: Mesh) -> Callable:
    """Jitted: arrays laid out split by rows over the batch axes of ``mesh`` (made once)."""
    return jax.jit(lambda out: out, out_shardings=NamedSharding(mesh, PartitionSpec(BATCH_AXES)))


def split_bank(
    graphdef: nnx.GraphDef,
    mesh: Mesh,
    data_dir,
    split: str,
    batch_size: int,
    params,
    rest,
    norm: tuple[float, float] | None = None,
) -> prototypes.Bank:
    """The PCAV-MAE memory bank of a split: every clip embedded as ``split_embeddings`` does,
    each host keeping the rows it embedded (nothing gathered), split over ``mesh``."""
    embed, keys = _embedder(graphdef), ("audio", "image")
    batches, local_batch, count, _ = _split_batches(data_dir, split, batch_size, norm=norm)
    by_rows = _split_by_rows(mesh)
    collected: dict[str, list[np.ndarray]] = {"audio": [], "visual": [], "position": []}
    for local in _padded(batches, [*keys, "position"], local_batch, count):
        out = by_rows(embed(params, rest, global_batch({k: local[k] for k in keys}, mesh)))
        valid = local["valid"]
        for name in ("audio", "visual"):
            collected[name].append(host_rows(out[name])[valid])
        collected["position"].append(local["position"][valid])
    parts = {name: np.concatenate(values) for name, values in collected.items()}
    return prototypes.bank_from_rows(parts["audio"], parts["visual"], parts["position"], mesh)


def host_rows(x: jax.Array) -> np.ndarray:
    """This host's rows of a global array split by rows, in order."""
    shards = {shard.index[0].start or 0: shard.data for shard in x.addressable_shards}
    return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])


def predict_inputs(
    apply: Callable[[dict], Mapping[str, jax.Array]],
    inputs: list[str],
    mesh: Mesh,
    batch_size: int,
    split: str = "eval",
    audio_length: int = 1024,
    norm: tuple[float, float] | None = None,
) -> tuple[list[str], dict[str, np.ndarray]]:
    """``apply`` over every readable clip of ``inputs``: one prepared dataset (its ``split``)
    or video files and folders, as batches ``{"audio", "image" [b, 10, ...]}`` (all frames), the
    global batch ``batch_size`` split over the hosts (each reads its share) and the mesh.
    Videos are read at ``audio_length`` fbank frames, normalised by ``norm`` (AudioSet's by
    default). Returns the clips' ids (a video's path) and the outputs, in input order."""
    if batch_size % mesh.size:
        raise UserError(f"--batch-size {batch_size} is not a multiple of the {mesh.size} devices")
    if len(inputs) == 1 and clip_inputs.is_dataset(inputs[0]):
        from input_pipeline.dataset import Loader, LoaderConfig

        out = predict_split(apply, mesh, inputs[0], split, batch_size, all_frames=True, norm=norm)
        ids = Loader(inputs[0], split, LoaderConfig(batch_size, num_classes=1, train=False)).ids()
        out.pop("label")
        return ids, out
    files = clip_inputs.video_files(inputs)
    local_batch = batch_size // jax.process_count()
    share = math.ceil(len(files) / jax.process_count())
    first = jax.process_index() * share
    mine = files[first : first + share]
    batches = clip_inputs.video_batches(mine, local_batch, first, audio_length, norm)
    empty = {  # what a host pads with when none of its clips can be read
        "audio": np.zeros((0, audio_length, clip_inputs.MEL_BINS), np.float32),
        "image": np.zeros((0, *clip_inputs.FRAMES_SHAPE), np.float32),
        "position": np.zeros((0,), np.int64),
    }
    count = batches_per_host(len(files), local_batch)
    out = gather_outputs(apply, batches, mesh, local_batch, count, tuple(empty), empty)
    position = out.pop("position")
    if not len(position):
        raise UserError(f"{' '.join(inputs)}: no clip could be read")
    order = np.argsort(position, kind="stable")
    return [files[p] for p in position[order]], {name: value[order] for name, value in out.items()}
