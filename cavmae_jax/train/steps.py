"""Pure, jitted steps over a split model: (params, rest, opt_state) in, updated out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx

from cavmae_jax.losses import CLASSIFICATION_LOSSES

SCALARS = ("loss", "loss_mae", "loss_mae_a", "loss_mae_v", "loss_c", "c_acc")


def _jit_train_step(
    loss_fn: Callable, tx: optax.GradientTransformation, shardings: tuple | None
) -> Callable:
    """A jitted ``(params, rest, opt_state, batch, key) -> (params, opt_state, metrics)`` from
    ``loss_fn(params, rest, batch, key) -> (loss, metrics)``.

    The params and optimizer state buffers are donated, so a step reuses their memory.
    ``shardings`` = (param shardings, optimizer-state shardings) keeps the updated state in its
    mesh layout."""

    def step(params, rest, opt_state, batch, key):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, rest, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return params, opt_state, metrics

    out_shardings = None if shardings is None else (shardings[0], shardings[1], None)
    return jax.jit(step, donate_argnums=(0, 2), out_shardings=out_shardings)


def make_pretrain_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    mask_kwargs: dict[str, Any],
    shardings: tuple | None = None,
) -> Callable:
    """CAV-MAE pretraining step: the model's own loss under fresh random masks (``key``).
    ``params`` are the trainable ``nnx.Param`` leaves; ``rest`` holds fixed tables."""

    def loss_fn(params, rest, batch, key):
        model = nnx.merge(graphdef, params, rest)
        out = model(batch["audio"], batch["image"], key=key, **mask_kwargs)
        return out["loss"], {name: out[name] for name in SCALARS}

    return _jit_train_step(loss_fn, tx, shardings)


def make_finetune_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    mode: str,
    loss: str,
    shardings: tuple | None = None,
) -> Callable:
    """Classification step: ``loss`` ("bce" or "ce") of the logits in finetuning ``mode``
    against the batch's soft labels (``key`` is unused: finetuning draws no masks)."""
    loss_of = CLASSIFICATION_LOSSES[loss]

    def loss_fn(params, rest, batch, key):
        logits = nnx.merge(graphdef, params, rest)(batch["audio"], batch["image"], mode=mode)
        value = loss_of(logits, batch["label"])
        return value, {"loss": value}

    return _jit_train_step(loss_fn, tx, shardings)


def make_logits_step(graphdef: nnx.GraphDef, mode: str) -> Callable:
    """Jitted ``(params, rest, batch) -> {"logits": [B, K]}`` for evaluation."""

    def logits(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        return {"logits": model(batch["audio"], batch["image"], mode=mode)}

    return jax.jit(logits)


PCAV_SCALARS = ("loss", "loss_pje", "loss_pcpe", "loss_r", "loss_mae_a", "loss_mae_v", "p_acc")


def make_pcav_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    model_kwargs: dict[str, Any],
    ema_momentum: float,
    use_decoder: bool,
    state_shardings: dict | None = None,
) -> Callable:
    """PCAV-MAE step over the whole state ``{params, opt_state, ema, protos, ...}``:
    ``(state, rest, batch, key) -> (state, metrics)``. The momentum (EMA) encoder embeds the
    unmasked batch to find each clip's prototypes; after the update, the EMA follows the
    parameters. The state is donated."""
    from cavmae_jax.models.pcav_mae import clip_prototypes, ema_update

    def loss_fn(params, rest, batch, key, ema, protos):
        momentum = nnx.merge(graphdef, ema, rest)
        audio_m, visual_m = jax.lax.stop_gradient(momentum.embed(batch["audio"], batch["image"]))
        targets = clip_prototypes(
            audio_m, visual_m, protos["audio"], protos["visual"], protos["valid"]
        )
        out = nnx.merge(graphdef, params, rest)(
            batch["audio"], batch["image"], protos, targets, key=key, use_decoder=use_decoder,
            **model_kwargs,
        )  # fmt: skip
        return out["loss"], {name: out[name] for name in PCAV_SCALARS}

    def step(state, rest, batch, key):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(
            state["params"], rest, batch, key, state["ema"], state["protos"]
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = ema_update(state["ema"], params, ema_momentum)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return {**state, "params": params, "opt_state": opt_state, "ema": ema}, metrics

    out_shardings = None if state_shardings is None else (state_shardings, None)
    return jax.jit(step, donate_argnums=(0,), out_shardings=out_shardings)
