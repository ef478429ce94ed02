"""The one jitted training step of every trainer: ``state, metrics = step(state, batch)``.

``state`` is a dict: ``step`` (updates done), ``params`` (trainable), ``rest`` (fixed tables),
``opt_state`` and whatever the trainer keeps (momentum encoder, prototypes, weight-average sum).
One call is one optimizer update. With ``grad_accum`` = k the global batch is split into k
micro-batches whose gradients are averaged by a ``lax.scan`` inside the step, so schedules,
the random key, checkpoints and logs count updates, never micro-batches. Micro-batch i holds
rows i, i + k, i + 2k, ... of the batch: every device keeps its own rows (no resharding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cavmae_jax.sharding import BATCH_AXES

# (params, state, batch, key) -> (loss, metrics): the trainer's loss on one (micro-)batch
LossFn = Callable[[Any, dict, dict, jax.Array], tuple[jax.Array, dict]]
# (state before the update, new params, new step) -> the extra state entries it changes
AfterUpdate = Callable[[dict, Any, jax.Array], dict]


@dataclasses.dataclass(frozen=True)
class SplitLoss:
    """A loss of per-clip terms and one term across the clips (a contrastive loss), split so
    that micro-batches still see the whole batch's clips in the cross-clip term
    (``cached_gradients``). Called as a ``LossFn`` it is the sum of both on one batch.

    ``noise(key, clips)``: the per-clip random inputs (masks), drawn for the whole batch so
    that a clip's draw does not depend on the micro-batch it falls in. ``local(params, state,
    batch)`` (the batch with its noise): the per-clip loss (a mean over the batch), its
    metrics and the embeddings the cross-clip term reads. ``whole(embeddings)``: that term
    and its metrics."""

    noise: Callable[[jax.Array, int], dict]
    local: Callable[[Any, dict, dict], tuple[jax.Array, dict, Any]]
    whole: Callable[[Any], tuple[jax.Array, dict]]

    def __call__(self, params, state, batch, key):
        clips = jax.tree.leaves(batch)[0].shape[0]
        local, metrics, embeddings = self.local(params, state, {**batch, **self.noise(key, clips)})
        cross, cross_metrics = self.whole(embeddings)
        return local + cross, {**metrics, **cross_metrics, "loss": local + cross}


def micro_batches(batch: dict, count: int, mesh: Mesh | None) -> dict:
    """[B, ...] -> [count, B / count, ...]; micro-batch i takes rows i, i + count, ..."""

    def split(x):
        x = jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)
        if mesh is None:
            return x
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))
        )

    return jax.tree.map(split, batch)


def gathered(tree, shardings):
    """A params-shaped tree laid out whole along the ``fsdp`` axis (kept split along the others).
    Made once per update, outside the micro-batch loop, so that no micro-batch gathers every
    layer's weights again: FSDP's memory saving is kept for the optimizer state and the
    gradients, and the loop reads the weights as data parallelism would."""

    def whole(leaf, sharding):
        spec = PartitionSpec(*(None if axis == "fsdp" else axis for axis in sharding.spec))
        return jax.lax.with_sharding_constraint(leaf, NamedSharding(sharding.mesh, spec))

    return jax.tree.map(whole, tree, shardings)


def accumulated_gradients(
    loss_fn: LossFn, params, state, batch, key, count: int, mesh, shardings=None
):
    """Mean gradient and mean metrics over ``count`` micro-batches (the key folded with i).
    With the parameters' ``shardings`` the loop runs on ``gathered`` parameters and
    params-shaped state entries (the momentum encoder), and each micro-batch's gradient
    returns to the parameters' layout."""
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if count == 1:
        return grad_fn(params, state, batch, key)
    zeros = jax.tree.map(jnp.zeros_like, params)
    if shardings is not None:
        like_params = jax.tree.structure(params)
        state = {
            name: gathered(value, shardings) if jax.tree.structure(value) == like_params else value
            for name, value in state.items()
        }
        params = state["params"]

    def to_params_layout(grads):
        if shardings is None:
            return grads
        return jax.tree.map(jax.lax.with_sharding_constraint, grads, shardings)

    if isinstance(loss_fn, SplitLoss):
        return cached_gradients(loss_fn, params, state, batch, key, count, mesh, to_params_layout)

    def body(total, inputs):
        micro, index = inputs
        grads, metrics = grad_fn(params, state, micro, jax.random.fold_in(key, index))
        return jax.tree.map(jnp.add, total, to_params_layout(grads)), metrics

    inputs = (micro_batches(batch, count, mesh), jnp.arange(count))
    total, metrics = jax.lax.scan(body, zeros, inputs)
    return jax.tree.map(lambda g: g / count, total), jax.tree.map(jnp.mean, metrics)


def whole_batch(tree, count: int):
    """The inverse of ``micro_batches``: [count, B / count, ...] -> [B, ...] in batch order."""
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), tree)


def cached_gradients(
    loss_fn: SplitLoss, params, state, batch, key, count: int, mesh, to_params_layout
):
    """The gradient of ``loss_fn`` on the whole batch, in ``count`` micro-batches (gradient
    caching): a forward pass per micro-batch gives every clip's embedding (no gradient kept);
    the cross-clip term and its gradient with respect to the embeddings are taken over the
    whole batch; then each micro-batch backpropagates its per-clip loss plus that gradient
    through its own embeddings. Costs one more forward pass of what the embeddings need."""
    clips = jax.tree.leaves(batch)[0].shape[0]
    micro = micro_batches({**batch, **loss_fn.noise(key, clips)}, count, mesh)

    def embed(_, one):
        return None, loss_fn.local(params, state, one)[2]

    embeddings = whole_batch(jax.lax.scan(embed, None, micro)[1], count)
    (cross, cross_metrics), cotangents = jax.value_and_grad(loss_fn.whole, has_aux=True)(embeddings)

    def pulled(params, one, cotangent):
        local, metrics, own = loss_fn.local(params, state, one)
        inner = sum(jax.tree.leaves(jax.tree.map(jnp.vdot, cotangent, own)))
        return local + count * inner, {**metrics, "loss": local}

    def body(total, inputs):
        grads, metrics = jax.grad(pulled, has_aux=True)(params, *inputs)
        return jax.tree.map(jnp.add, total, to_params_layout(grads)), metrics

    inputs = (micro, micro_batches(cotangents, count, mesh))
    total, metrics = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), inputs)
    metrics = {**jax.tree.map(jnp.mean, metrics), **cross_metrics}
    metrics["loss"] = metrics["loss"] + cross
    return jax.tree.map(lambda g: g / count, total), metrics


class TrainStep:
    """``state, metrics = step(state, batch)``: the jitted update. The state is donated (its
    buffers are reused), except ``rest``: fixed tables pass through unchanged and stay valid,
    e.g. for an asynchronous checkpoint still reading them."""

    def __init__(self, jitted: Callable):
        self.jitted = jitted  # (state without rest, rest, batch) -> (state without rest, metrics)

    @staticmethod
    def _split(state: dict) -> tuple[dict, Any]:
        return {k: v for k, v in state.items() if k != "rest"}, state["rest"]

    def __call__(self, state: dict, batch: dict) -> tuple[dict, dict]:
        donated, rest = self._split(state)
        new, metrics = self.jitted(donated, rest, batch)
        return {**new, "rest": rest}, metrics

    def lower(self, state: dict, batch: dict):
        """``jax.jit(...).lower`` of the update (ahead-of-time compilation)."""
        return self.jitted.lower(*self._split(state), batch)

    def compile(self, state: dict, batch: dict) -> TrainStep:
        """The same step compiled ahead of time for these shapes (``.jitted`` is then the
        executable, with its ``memory_analysis()``)."""
        return TrainStep(self.lower(state, batch).compile())


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    seed: int,
    grad_accum: int = 1,
    after_update: AfterUpdate | None = None,
    state_shardings: dict | None = None,
    mesh: Mesh | None = None,
) -> TrainStep:
    """The step, kept in ``state_shardings``. The key of update s (from 1) is
    ``fold_in(key(seed), s)``. ``metrics["lr"]`` is the rate this update applied: the schedule
    at the optimizer's count, which is the number of updates done. With micro-batches on a
    mesh, the weights are ``gathered`` once per update."""
    param_shardings = state_shardings["params"] if state_shardings and mesh else None

    def update(donated, rest, batch):
        if mesh is None:
            return update_on_mesh(donated, rest, batch)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # for shard_map'd kernels
            return update_on_mesh(donated, rest, batch)

    def update_on_mesh(donated, rest, batch):
        state = {**donated, "rest": rest}
        done = state["step"]
        key = jax.random.fold_in(jax.random.key(seed), done + 1)
        params = state["params"]
        grads, metrics = accumulated_gradients(
            loss_fn, params, state, batch, key, grad_accum, mesh, param_shardings
        )
        with jax.named_scope("optimizer"):
            updates, opt_state = tx.update(grads, state["opt_state"], params)
            new_params = optax.apply_updates(params, updates)
        new = {**donated, "step": done + 1, "params": new_params, "opt_state": opt_state}
        if after_update is not None:
            new.update(after_update(state, new_params, done + 1))
        metrics.update(grad_norm=optax.tree.norm(grads), lr=schedule(done))
        return new, metrics

    out = None
    if state_shardings is not None:
        out = ({k: v for k, v in state_shardings.items() if k != "rest"}, None)
    return TrainStep(jax.jit(update, donate_argnums=(0,), out_shardings=out))
