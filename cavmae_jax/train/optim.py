"""The official optimizer: Adam (0.95, 0.999) with coupled L2 decay and a per-epoch MultiStep lr."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def multistep_schedule(
    lr: float, steps_per_epoch: int, start: int, every: int, decay: float
) -> optax.Schedule:
    """lr during epoch E (from 1) is lr * decay^n, n = 0 if E-1 < start else (E-1-start)//every + 1.

    This is ``MultiStepLR(milestones=range(start, 1000, every))`` stepped once per epoch (spec 4.1).
    """
    if start < 1 or every < 1:
        raise ValueError(
            f"MultiStep schedule needs start >= 1 and every >= 1, got {start}, {every}"
        )

    def schedule(step):
        done_epochs = step // steps_per_epoch
        decays = jnp.where(done_epochs < start, 0, (done_epochs - start) // every + 1)
        return lr * decay ** jnp.minimum(decays, len(range(start, 1000, every)))

    return schedule


def official_adam(
    schedule: optax.ScalarOrSchedule, weight_decay: float = 5e-7
) -> optax.GradientTransformation:
    """torch.optim.Adam(betas=(0.95, 0.999), eps=1e-8, weight_decay): L2 added to the gradient."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_adam(b1=0.95, b2=0.999, eps=1e-8),
        optax.scale_by_learning_rate(schedule),
    )
