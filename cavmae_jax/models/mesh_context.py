"""The mesh a model is traced under (trainers set it with ``jax.sharding.use_abstract_mesh``).

Under FSDP the parameters are sharded over ``fsdp`` and the batch over ``slice``, ``data`` and
``fsdp``. Left to itself, XLA's sharding propagation carries the parameters' sharding into the
activations and turns FSDP into an accidental tensor parallelism (hundreds of all-reduces, more
FLOPs, 3x the memory for CAV-MAE). Two constraints keep the intended pattern: every block's
activations stay split over the batch, and every block's parameters are gathered whole before
use (their gradients are then reduce-scattered by the transpose). Without a mesh both are
no-ops.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec


def batch_axes(mesh) -> tuple[str, ...]:
    """The mesh axes that split the batch: all but ``tensor``."""
    return tuple(a for a in mesh.axis_names if a != "tensor")


def split_over_batch(x: jax.Array) -> jax.Array:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(batch_axes(mesh)))


def gathered(tree):
    """``tree`` replicated over the batch axes (its ``tensor`` split is kept by XLA's choice)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "fsdp" not in mesh.axis_names or mesh.shape["fsdp"] == 1:
        return tree
    with jax.named_scope("fsdp_gather"):
        return jax.tree.map(lambda p: jax.lax.with_sharding_constraint(p, PartitionSpec()), tree)
