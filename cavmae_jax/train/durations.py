"""Training durations: recipes say epochs, the run counts updates of the global batch.

Updates per epoch are resolved at start-up from the prepared dataset's size (a partial AudioSet
download then still follows the recipe per epoch): ``clips // batch_size`` with ``batch_size``
the global batch per update, whatever ``grad_accum`` splits it into.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import optax

from cavmae_jax.errors import UserError
from cavmae_jax.train.optim import multistep_schedule, warmup_cosine


@dataclasses.dataclass(frozen=True)
class Durations:
    clips: int  # training clips of the split (all hosts)
    batch_size: int  # global batch per update
    steps_per_epoch: int  # updates per epoch
    num_steps: int  # updates of the whole run

    def steps(self, epochs: float) -> int:
        """Updates in ``epochs`` epochs (rounded)."""
        return round(epochs * self.steps_per_epoch)

    def summary(self) -> str:
        return (
            f"{self.clips} clips, {self.batch_size} per update -> {self.steps_per_epoch} updates "
            f"per epoch; {self.num_steps} updates ({self.num_steps / self.steps_per_epoch:g} "
            f"epochs)"
        )


def resolve(config: ml_collections.ConfigDict, clips: int, steps_per_epoch: int) -> Durations:
    """``config.epochs`` epochs of ``steps_per_epoch`` updates, unless ``config.num_steps``
    (> 0) sets the run's length in updates (short runs, tests)."""
    if steps_per_epoch < 1:
        raise UserError(
            f"{clips} training clips make no full batch of {config.batch_size}: reduce "
            "--config.batch_size or add data"
        )
    total = config.num_steps or round(config.epochs * steps_per_epoch)
    return Durations(clips, config.batch_size, steps_per_epoch, total)


def learning_rate(config: ml_collections.ConfigDict, durations: Durations) -> optax.Schedule:
    """The official per-epoch MultiStep schedule, or warmup + cosine ending at the last update
    (``config.schedule``), in updates."""
    if config.schedule == "cosine":
        warmup = durations.steps(config.warmup_epochs)
        return warmup_cosine(config.lr, warmup, durations.num_steps)
    return multistep_schedule(
        config.lr,
        durations.steps_per_epoch,
        config.lr_decay_start,
        config.lr_decay_every,
        config.lr_decay,
    )


def schedule_summary(config: ml_collections.ConfigDict, durations: Durations) -> str:
    """One line on the learning rate, in updates."""
    if config.schedule == "cosine":
        warmup = durations.steps(config.warmup_epochs)
        return (
            f"lr: linear warmup over {warmup} updates to {config.lr:g}, cosine to 0 at update "
            f"{durations.num_steps}"
        )
    first = config.lr_decay_start * durations.steps_per_epoch
    return (
        f"lr: {config.lr:g}, x{config.lr_decay:g} every {config.lr_decay_every} epoch(s) from "
        f"update {first} (epoch {config.lr_decay_start})"
    )
