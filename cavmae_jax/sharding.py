"""Device mesh, logical-axis rules, sharded parameter creation and global batches.

Parameters carry logical axis names (``embed``, ``mlp``, ``qkv``, ``heads``, ``layers``...). A
rules table maps each to a mesh axis (``data``, ``fsdp``, ``tensor``) or to nothing (replicated),
so data parallel, FSDP or tensor parallel is configuration. A dimension that a mesh axis does not
divide, or that an earlier dimension of the same parameter already uses, stays replicated.

The outermost mesh axis, ``slice``, is the number of TPU slices the devices come from (1 on a
single slice or a GPU host). Slices talk over the data-centre network (DCN), much slower than
the chips' interconnect, so they only split the batch: parameters are replicated across slices
and sharded within one, and the configured mesh shape is that of one slice.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Mapping

import jax
import numpy as np
import optax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cavmae_jax.errors import UserError

MESH_AXES = ("slice", "data", "fsdp", "tensor")
BATCH_AXES = ("slice", "data", "fsdp")  # FSDP is data parallel too

DATA_PARALLEL_RULES: dict[str, str | None] = {}  # every parameter replicated
FSDP_RULES = {"embed": "fsdp", "decoder": "fsdp", "classes": "fsdp"}
TENSOR_RULES = {"mlp": "tensor", "qkv": "tensor", "heads": "tensor"}
RULES = {"dp": DATA_PARALLEL_RULES, "fsdp": FSDP_RULES, "tensor": TENSOR_RULES}  # by config name


def make_mesh(shape: Mapping[str, int], devices=None) -> Mesh:
    """Mesh over ``slice``, ``data``, ``fsdp``, ``tensor``: ``shape`` gives the last three
    within one slice (one size may be -1: the remaining devices); ``slice`` is the devices'
    slice count."""
    devices = list(jax.devices() if devices is None else devices)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    per_slice = len(devices) // slices
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES[1:]]
    known = int(np.prod([s for s in sizes if s != -1]))
    if sizes.count(-1) > 1 or per_slice % known:
        raise UserError(f"mesh {dict(shape)} does not fit {per_slice} devices per slice")
    sizes = [per_slice // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != per_slice:
        shown = dict(zip(MESH_AXES[1:], sizes, strict=True))
        raise UserError(f"mesh {shown} needs {np.prod(sizes)} devices per slice, not {per_slice}")
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if slices == 1:
        return jax.make_mesh((1, *sizes), MESH_AXES, axis_types=auto, devices=devices)
    grid = mesh_utils.create_hybrid_device_mesh(
        (1, *sizes), (slices, 1, 1, 1), devices, allow_split_physical_axes=True
    )
    return Mesh(grid, MESH_AXES, axis_types=auto)


def _spec(names, shape, mesh: Mesh, rules: Mapping[str, str | None]) -> PartitionSpec:
    axes: list[str | None] = []
    for name, size in zip(names or (None,) * len(shape), shape, strict=True):
        axis = rules.get(name) if name else None
        usable = axis and axis not in axes and size % mesh.shape[axis] == 0
        axes.append(axis if usable else None)
    return PartitionSpec(*axes)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, str | None]):
    """NamedSharding per variable of ``state`` (abstract or concrete) from its logical names."""

    def sharding(var):
        names = var.get_metadata().get("out_sharding")
        return var.replace(NamedSharding(mesh, _spec(names, var.shape, mesh, rules)))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(
    make: Callable[[], nnx.Module], mesh: Mesh, rules: Mapping[str, str | None]
) -> nnx.Module:
    """Build a model with every parameter created directly in its sharded layout."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def optimizer_shardings(tx: optax.GradientTransformation, params, param_shardings):
    """Shardings of ``tx.init(params)``: every leaf inside a params-shaped subtree (Adam moments,
    also under masks or multi-transforms) takes its parameter's sharding; counters replicate."""
    abstract = jax.eval_shape(tx.init, params)
    by_path = {
        jax.tree_util.keystr(path): sharding
        for path, sharding in jax.tree_util.tree_leaves_with_path(
            param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding)
        )
    }
    mesh = next(iter(by_path.values())).mesh
    replicated = NamedSharding(mesh, PartitionSpec())

    def sharding(path, leaf):
        name = jax.tree_util.keystr(path)
        matches = [suffix for suffix in by_path if name.endswith(suffix)]
        return by_path[max(matches, key=len)] if matches else replicated

    return jax.tree_util.tree_map_with_path(sharding, abstract)


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over the batch axes (and over the hosts)."""
    shards = int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))
    if batch_size % shards or batch_size % jax.process_count():
        raise UserError(
            f"global batch {batch_size} does not split over {shards} batch shards "
            f"(mesh slice x data x fsdp) and {jax.process_count()} host(s)"
        )


def batches_ahead(
    local_batches: Iterator[Mapping[str, np.ndarray]], keys, mesh: Mesh, depth: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """Global batches of ``keys``, each sent to the devices ``depth`` updates before it is
    used: reading the next batches and copying them to the devices overlap the updates."""
    queue = collections.deque()
    for local in local_batches:
        queue.append(global_batch({k: local[k] for k in keys}, mesh))
        if len(queue) > depth:
            yield queue.popleft()
    yield from queue


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This host's part of the batch -> global arrays split over the batch axes of ``mesh``."""
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for name, value in local.items()
    }
