"""The one setup path of every trainer: config -> mesh, data, model, steps, evaluators, and a
fresh sharded initial state. ``launch/aot_check.py`` calls it too, abstractly (no data read,
nothing allocated), so the compile check is the training code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cavmae_jax import evaluators as evaluators_lib
from cavmae_jax import paths, sharding
from cavmae_jax.errors import UserError
from cavmae_jax.models import ModelConfig, fused_mlp
from cavmae_jax.models.attention import resolve as resolve_attention
from cavmae_jax.models.layers import resolve_remat
from cavmae_jax.train import data_settings
from cavmae_jax.train import durations as durations_lib
from cavmae_jax.train.durations import Durations
from cavmae_jax.train.finetune import Finetuning
from cavmae_jax.train.init_weights import copy_weights
from cavmae_jax.train.optim import make_optimizer
from cavmae_jax.train.pcav import PCAVPretraining
from cavmae_jax.train.pretrain import CAVMAEPretraining
from cavmae_jax.train.steps import make_train_step
from cavmae_jax.train.trainer import Trainer

TRAINERS = {"pretrain": CAVMAEPretraining, "finetune": Finetuning, "pcav": PCAVPretraining}


def trainer_named(name: str) -> Trainer:
    """The trainer a config names (``config.trainer``)."""
    if name not in TRAINERS:
        raise UserError(f"unknown trainer {name!r}; expected one of {list(TRAINERS)}")
    return TRAINERS[name]()


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a run needs but its state (``build`` returns that beside it: the loop donates
    the state's buffers to the step, so nothing here holds them)."""

    config: ml_collections.ConfigDict
    trainer: Trainer
    cfg: ModelConfig
    mesh: Mesh
    graphdef: nnx.GraphDef
    state_shardings: dict
    durations: Durations
    steps: list[tuple[int, Callable]]  # (last update, jitted step) of each phase
    clip_flops: tuple[float, ...]  # training FLOPs per clip of each phase
    data_dir: paths.Path | None = None
    batches_from: Callable[[int], Iterator[dict]] | None = None  # start update -> host batches
    refreshes: list = dataclasses.field(default_factory=list)  # (name, Period, state -> state)
    evaluators: list = dataclasses.field(default_factory=list)  # (name, Period, evaluator)
    # the concrete initial state (created sharded, config.init loaded), for a run not resumed
    fresh_state: Callable[[], dict] | None = None

    def step_at(self, update: int) -> Callable:
        """The jitted step that makes update ``update`` (from 1)."""
        return next(step for last, step in self.steps if update <= last)

    def flops_at(self, update: int) -> float:
        """Training FLOPs per clip of update ``update`` (from 1): its phase's (a trainer states
        them for every phase it can have; a run may have fewer)."""
        lasts = [last for last, _ in self.steps]
        return next(f for last, f in zip(lasts, self.clip_flops, strict=False) if update <= last)

    def model(self, params, rest) -> nnx.Module:
        return nnx.merge(self.graphdef, params, rest)


def prepared_dataset(config: ml_collections.ConfigDict) -> paths.Path:
    """The prepared dataset ``config.data.dir``."""
    if not config.data.dir:
        raise UserError(
            "no training data: set --config.data.dir to a `cavmae prepare` output (generated "
            "demo data: cavmae prepare --demo 240 --output DIR)"
        )
    return paths.path(config.data.dir)


def model_config(trainer: Trainer, config: ml_collections.ConfigDict, mesh: Mesh) -> ModelConfig:
    """The trainer's model config with the attention implementation and the remat policy
    resolved for the platform of the mesh's devices (not the host's default backend)."""
    cfg = trainer.model_config(config)
    platform = mesh.devices.flat[0].platform
    return cfg.replace(
        attention=resolve_attention(cfg.attention, platform),
        remat=resolve_remat(cfg.remat, platform),
        mlp=fused_mlp.resolve(cfg.mlp, platform),
    )


def check_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """The global batch must split into ``grad_accum`` micro-batches that split over the mesh."""
    if config.batch_size % config.grad_accum:
        raise UserError(
            f"global batch {config.batch_size} does not split into {config.grad_accum} "
            "micro-batches (grad_accum)"
        )
    sharding.check_batch_size(config.batch_size // config.grad_accum, mesh)
    sharding.check_batch_size(config.batch_size, mesh)


def _placed(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def initial_state(
    trainer: Trainer,
    config: ml_collections.ConfigDict,
    cfg: ModelConfig,
    mesh: Mesh,
    optimizer_for: Callable,
    abstract: bool,
) -> tuple:
    """(graphdef, state, state shardings, optimizer): the model created sharded (then
    overwritten with ``config.init``), the state of ``optimizer_for(params)`` and the trainer's
    extra state in the parameters' layout; with ``abstract`` only shapes and shardings."""
    rules = sharding.RULES[config.sharding]

    def make():
        return trainer.create(cfg, config.seed)

    if abstract:
        model = nnx.eval_shape(make)
    else:
        model = sharding.create_sharded(make, mesh, rules)
        if config.init:
            loaded = trainer.load_init(config.init, cfg, config.seed)
            fit, own = config.init_positions, trainer.own_layers
            for note in copy_weights(loaded, model, config.init, fit, own):
                if jax.process_index() == 0:
                    print(f"init: {note}")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optimizer_for(params)
    param_shardings = sharding.state_shardings(params, mesh, rules)
    rest_shardings = sharding.state_shardings(rest, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())

    def derived(params):
        return {
            "step": jnp.zeros((), jnp.int32),
            "opt_state": tx.init(params),
            **trainer.extra_state(config, cfg, params),
        }

    shapes = jax.eval_shape(derived, params)
    params_like = jax.tree.structure(params)

    def like_params(tree):
        if jax.tree.structure(tree) == params_like:
            return param_shardings
        return jax.tree.map(lambda _: replicated, tree)

    shardings = {
        "params": param_shardings,
        "rest": rest_shardings,
        "step": replicated,
        "opt_state": sharding.optimizer_shardings(tx, params, param_shardings),
        **{name: like_params(shapes[name]) for name in shapes if name not in ("step", "opt_state")},
    }
    if abstract:
        state = {
            "params": _placed(params, param_shardings),
            "rest": _placed(rest, rest_shardings),
            **_placed(shapes, {k: shardings[k] for k in shapes}),
        }
    else:
        out = {k: shardings[k] for k in shapes}
        state = {"params": params, "rest": rest, **jax.jit(derived, out_shardings=out)(params)}
    return graphdef, state, shardings, tx


def build(
    config: ml_collections.ConfigDict,
    workdir: paths.Path | None = None,
    abstract_clips: int | None = None,
    devices=None,
    fresh: bool = True,
) -> tuple[Setup, dict]:
    """The run of ``config`` in ``workdir`` and its initial state. With ``abstract_clips``
    nothing is read or allocated: durations assume that many training clips and the state is
    ``ShapeDtypeStruct``s (for ahead-of-time compilation on ``devices``, e.g. a TPU
    topology's). With ``fresh=False`` the data is read but the state is abstract too, the
    target a checkpoint restores into, so that a resumed run never holds the initial state
    beside the restored one; ``setup.fresh_state()`` makes the initial one when needed."""
    trainer = trainer_named(config.trainer)
    mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
    check_batch(config, mesh)
    abstract = abstract_clips is not None
    data_dir = loader = None
    if abstract:
        steps_per_epoch = max(abstract_clips // config.batch_size, 1)
        clips = abstract_clips
    else:
        if workdir is None:
            raise UserError(
                "a run needs a workdir (its checkpoints and metrics go there); "
                "only an abstract build (abstract_clips=N) goes without"
            )
        data_dir = prepared_dataset(config)
        config = data_settings.settle(config, data_dir)
        loader = trainer.loader(config, data_dir, workdir)
        steps_per_epoch = loader.batches_per_epoch
        clips = loader.split_examples
    durations = durations_lib.resolve(config, clips, steps_per_epoch)
    schedule = durations_lib.learning_rate(config, durations)
    cfg = model_config(trainer, config, mesh)

    def optimizer(params):
        return make_optimizer(
            schedule,
            params,
            config.optimizer,
            config.weight_decay,
            clip_norm=config.clip_norm,
            b1=config.b1,
            **trainer.optimizer_options(config),
        )

    graphdef, state, shardings, tx = initial_state(
        trainer, config, cfg, mesh, optimizer, abstract=abstract or not fresh
    )

    def fresh_state() -> dict:
        return initial_state(trainer, config, cfg, mesh, optimizer, abstract=False)[1]

    after_update = trainer.after_update(config, durations)
    steps = [
        (
            last,
            make_train_step(
                loss_fn,
                tx,
                schedule,
                config.seed,
                config.grad_accum,
                after_update,
                shardings,
                mesh,
            ),
        )
        for last, loss_fn in trainer.loss_phases(graphdef, config, durations)
    ]
    batches_from, refreshes, evaluators = None, [], []
    if not abstract:
        per_epoch = durations.steps_per_epoch
        batches_from = loader.iterate_from
        refreshes = trainer.refreshes(config, graphdef, mesh, data_dir, per_epoch)
        evaluators = evaluators_lib.from_config(config, graphdef, mesh, data_dir, per_epoch)
    setup = Setup(
        config,
        trainer,
        cfg,
        mesh,
        graphdef,
        shardings,
        durations,
        steps,
        trainer.clip_flops(config, cfg),
        data_dir,
        batches_from,
        refreshes,
        evaluators,
        None if abstract else fresh_state,
    )
    return setup, state


def abstract_batch(config: ml_collections.ConfigDict, setup: Setup) -> dict[str, Any]:
    """The global batch of one update as ``ShapeDtypeStruct``s split over the mesh."""
    cfg, b = setup.cfg, config.batch_size
    split = NamedSharding(setup.mesh, PartitionSpec(sharding.BATCH_AXES))
    shapes = {
        "audio": (b, cfg.audio_length, cfg.num_mel_bins),
        "image": (b, cfg.img_size, cfg.img_size, 3),
        "label": (b, cfg.label_dim),
    }
    return {
        k: jax.ShapeDtypeStruct(shapes[k], "float32", sharding=split)
        for k in setup.trainer.batch_keys
    }
