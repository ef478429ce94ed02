"""Pure, jitted training steps over a split model: (params, rest, opt_state) in, updated out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx

SCALARS = ("loss", "loss_mae", "loss_mae_a", "loss_mae_v", "loss_c", "c_acc")


def make_pretrain_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    mask_kwargs: dict[str, Any],
    shardings: tuple | None = None,
) -> Callable:
    """A jitted step ``(params, rest, opt_state, batch, key) -> (params, opt_state, metrics)``.

    ``params`` are the trainable ``nnx.Param`` leaves; ``rest`` holds fixed tables. The params and
    optimizer state buffers are donated, so a step reuses their memory. ``shardings`` =
    (param shardings, optimizer-state shardings) keeps the updated state in its mesh layout.
    """

    def loss_fn(params, rest, batch, key):
        model = nnx.merge(graphdef, params, rest)
        out = model(batch["audio"], batch["image"], key=key, **mask_kwargs)
        return out["loss"], {name: out[name] for name in SCALARS}

    def step(params, rest, opt_state, batch, key):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, rest, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return params, opt_state, metrics

    out_shardings = None if shardings is None else (shardings[0], shardings[1], None)
    return jax.jit(step, donate_argnums=(0, 2), out_shardings=out_shardings)
