"""The official optimizer: Adam (0.95, 0.999) with coupled L2 decay and a per-epoch MultiStep lr."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cavmae_jax.errors import UserError


def multistep_schedule(
    lr: float, steps_per_epoch: int, start: int, every: int, decay: float
) -> optax.Schedule:
    """lr during epoch E (from 1) is lr * decay^n, n = 0 if E-1 < start else (E-1-start)//every + 1.

    This is ``MultiStepLR(milestones=range(start, 1000, every))`` stepped once per epoch
    (official behaviour 27).
    """
    if start < 1 or every < 1:
        raise UserError(f"MultiStep schedule needs start >= 1 and every >= 1, got {start}, {every}")

    def schedule(step):
        done_epochs = step // steps_per_epoch
        decays = jnp.where(done_epochs < start, 0, (done_epochs - start) // every + 1)
        return lr * decay ** jnp.minimum(decays, len(range(start, 1000, every)))

    return schedule


def official_adam(
    schedule: optax.ScalarOrSchedule, weight_decay: float = 5e-7, b1: float = 0.95
) -> optax.GradientTransformation:
    """torch.optim.Adam(betas=(b1, 0.999), eps=1e-8, weight_decay): L2 added to the gradient
    (the official recipes' b1 is 0.95)."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_adam(b1=b1, b2=0.999, eps=1e-8),
        optax.scale_by_learning_rate(schedule),
    )


def warmup_cosine(lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr``, then cosine decay to 0 at ``total_steps``."""
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps, max(total_steps, warmup_steps + 1)
    )


def head_labels(params) -> object:
    """'head' for the classifier head (``mlp_head``), 'base' for everything else."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "head" if "mlp_head" in jax.tree_util.keystr(path) else "base", params
    )


def make_optimizer(
    schedule: optax.ScalarOrSchedule,
    params,
    kind: str = "adam_l2",
    weight_decay: float = 5e-7,
    head_lr: float = 1.0,
    freeze_base: bool = False,
    clip_norm: float | None = None,
    b1: float = 0.95,
) -> optax.GradientTransformation:
    """The training optimizer. ``adam_l2`` is the official coupled-L2 Adam, ``adamw`` decoupled
    AdamW, both with first-moment decay ``b1`` (the official Adam's 0.95 unless set). The head's
    updates are scaled by ``head_lr`` (the official second parameter group); ``freeze_base``
    trains the head only (linear probe); ``clip_norm`` clips the global gradient norm first.
    Gradient accumulation is part of the step (``train/steps.py``), not an optimizer wrapper,
    so that the schedule advances once per update."""
    if kind == "adam_l2":
        tx = official_adam(schedule, weight_decay, b1)
    elif kind == "adamw":
        tx = optax.adamw(schedule, b1=b1, b2=0.999, eps=1e-8, weight_decay=weight_decay)
    else:
        raise UserError(f"unknown optimizer {kind!r}; expected 'adam_l2' or 'adamw'")
    base = optax.set_to_zero() if freeze_base else tx
    head = optax.chain(tx, optax.scale(head_lr)) if head_lr != 1.0 else tx
    tx = optax.multi_transform({"base": base, "head": head}, head_labels(params))
    if clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    return tx
