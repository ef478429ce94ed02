"""PCAV-MAE pretraining: the shared loop plus a momentum encoder and a prototype memory bank.

Before the first step and every ``pcav.refresh_every`` steps, the momentum encoder embeds every
clip of the training split (evaluation view: frame 5, no augmentation; batched on the mesh), and
the prototypes of every granularity are found on that memory bank (``cavmae_jax/prototypes.py``).
Prototypes, momentum parameters, parameters and optimizer state are all checkpointed, so a
resumed run continues exactly. For the first ``pcav.decoder_epochs`` epochs all three losses
train; after that the decoder is dropped and only eq. (1) trains the encoders.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from cavmae_jax import convert, flops, prototypes
from cavmae_jax.models.pcav_mae import PCAVMAE, pcav_config
from cavmae_jax.train.inference import batches_per_host, gather_outputs
from cavmae_jax.train.loop import Hooks, build_state, load_model, prepared_dataset, train
from cavmae_jax.train.metrics import plot_curves
from cavmae_jax.train.pretrain import training_batches
from cavmae_jax.train.steps import make_pcav_step


def memory_bank(graphdef, ema, rest, mesh, data_dir: Path, batch_size: int) -> dict:
    """Momentum embeddings ``audio``, ``visual`` [N, D] of every training clip, the batches
    split over the mesh (``ema``: the momentum parameters)."""
    from input_pipeline.dataset import Loader, LoaderConfig

    @jax.jit
    def embed(ema, rest, batch):
        audio, visual = nnx.merge(graphdef, ema, rest).embed(batch["audio"], batch["image"])
        return {"audio": audio, "visual": visual}

    local = batch_size // jax.process_count()
    hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
    config = LoaderConfig(batch_size=local, num_classes=1, train=False, **hosts)
    loader = Loader(data_dir, "train", config)
    count = batches_per_host(loader.builder.info.splits["train"].num_examples, local, False)
    out = gather_outputs(lambda b: embed(ema, rest, b), loader, mesh, local, count,
                         keys=("audio", "image"))  # fmt: skip
    return {"audio": out["audio"], "visual": out["visual"]}


def find_prototypes(bank: dict, pcav: ml_collections.ConfigDict, seed: int, mesh=None):
    """The prototype arrays of a memory bank under the run's settings, computed over ``mesh``."""
    return prototypes.discover(
        bank["audio"], bank["visual"], pcav.method, tuple(pcav.granularities),
        pcav.max_prototypes, pcav.beta, pcav.gamma_mean, seed, mesh=mesh,
    )  # fmt: skip


def pcav_pretrain(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, float]:
    """Pretrain ``PCAVMAE`` for ``config.num_steps`` steps in ``workdir`` (resuming if possible);
    the final model goes to ``workdir/model`` and the run's settings to ``workdir/config.json``."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = prepared_dataset(config, workdir)
    pcav = config.pcav
    cfg = pcav_config(**config.model.to_dict())
    ts = build_state(
        config, lambda: PCAVMAE(cfg, nnx.Rngs(config.seed)), config.steps_per_epoch,
        load_init=lambda source: load_model(source, "CAVMAE"), b1=config.b1,
    )  # fmt: skip
    replicated = NamedSharding(ts.mesh, PartitionSpec())
    k, d, levels = pcav.max_prototypes, cfg.embed_dim, len(pcav.granularities)
    empty = {"audio": jnp.zeros((levels, k, d)), "visual": jnp.zeros((levels, k, d)),
             "gamma": jnp.ones((levels, k)), "valid": jnp.zeros((levels, k), bool)}  # fmt: skip
    shardings = {
        "params": ts.param_shardings, "opt_state": ts.opt_shardings, "ema": ts.param_shardings,
        "protos": jax.tree.map(lambda _: replicated, empty),
    }  # fmt: skip
    ema = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=ts.param_shardings)
    kwargs = dict(mask_ratio_a=config.mask_ratio_a, mask_ratio_v=config.mask_ratio_v,
                  tau=pcav.tau)  # fmt: skip
    steps = {
        use: make_pcav_step(ts.graphdef, ts.tx, kwargs, pcav.ema_momentum, use, shardings)
        for use in (True, False)
    }
    decoder_steps = pcav.decoder_epochs * config.steps_per_epoch

    def refresh(state: dict) -> None:
        bank = memory_bank(ts.graphdef, state["ema"], ts.rest, ts.mesh, data_dir,
                           config.batch_size)  # fmt: skip
        arrays, _ = find_prototypes(bank, pcav, config.seed, ts.mesh)
        state["protos"] = jax.device_put(arrays, replicated)

    def state_step(state, rest, batch, key, step):
        return steps[step <= decoder_steps](state, rest, batch, key)

    hooks = Hooks(
        batches_from=training_batches(config, data_dir),
        batch_keys=("audio", "image"),
        clip_flops=flops.pretrain_step(cfg, config.mask_ratio_a, config.mask_ratio_v)
        + flops.features_forward(cfg),  # the momentum encoder's forward
        extra_state={"ema": ema(ts.params), "protos": jax.device_put(empty, replicated)},
        on_start=lambda start, state: refresh(state) if start == 0 else None,
        after_step=lambda step, state: refresh(state) if step % pcav.refresh_every == 0 else None,
        state_step=state_step,
        shown=("loss", "p_acc"),
    )
    state, logged, finished = train(config, workdir, ts, None, hooks)
    if finished and jax.process_index() == 0:
        convert.save_checkpoint(ts.model(state["params"]), workdir / "model")
        convert.save_checkpoint(ts.model(state["ema"]), workdir / "momentum_model")
        (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
        plot_curves(workdir, workdir / "loss.png")
    return logged
