"""PCAV-MAE model: the paper's sizes, losses from prototypes, momentum encoder, assignments."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_inputs
from flax import nnx

from cavmae_jax import convert, losses
from cavmae_jax.losses import l2_normalize as unit
from cavmae_jax.models.pcav_mae import PCAVMAE, clip_prototypes, ema_update, pcav_config
from cavmae_jax.train.durations import Durations
from cavmae_jax.train.pcav import PHASES, PCAVPretraining


def small(**changes):
    base = dict(
        img_size=16,
        audio_length=32,
        num_mel_bins=16,
        patch_size=4,
        embed_dim=32,
        depth=3,
        modality_specific_depth=2,
        num_heads=4,
        decoder_embed_dim=16,
        decoder_num_heads=2,
    )
    base.update(changes)
    return pcav_config(**base)


def prototypes_for(model, audio, image, g=2, k=3):
    za, zv = model.clip_embeddings(audio, image)
    idx = np.array([[0, 1, 2], [3, 0, 1]])[:g, :k]
    protos = {
        "audio": za[idx],
        "visual": zv[idx],
        "gamma": jnp.full((g, k), 0.1),
        "valid": jnp.ones((g, k), bool),
    }
    return protos, clip_prototypes(za, zv, protos["audio"], protos["visual"], protos["valid"])


def test_paper_sizes():
    cfg = pcav_config()
    assert (cfg.embed_dim, cfg.modality_specific_depth, cfg.depth) == (768, 11, 12)
    assert (cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads) == (384, 4, 6)
    assert int(cfg.decoder_embed_dim * cfg.mlp_ratio) == 1536


@pytest.fixture(scope="module")
def setup():
    model = PCAVMAE(small(), nnx.Rngs(0))
    audio, image = random_inputs(model.cfg, 4)
    protos, targets = prototypes_for(model, audio, image)
    graphdef, state = nnx.split(model)
    run = jax.jit(
        lambda state, key, use_decoder: nnx.merge(graphdef, state)(
            audio, image, protos, targets, key=key, use_decoder=use_decoder
        ),
        static_argnums=2,
    )
    return model, state, run, audio, image, protos, targets


def test_losses_are_the_sum_of_the_three_equations_and_masks_follow_the_ratios(setup):
    model, state, run, audio, image, protos, targets = setup
    key = jax.random.key(1)
    out = run(state, key, True)
    assert out["mask_a"].sum(1).tolist() == [16] * 4  # 50% of 32 audio tokens
    assert out["mask_v"].sum(1).tolist() == [12] * 4  # 75% of 16 visual tokens
    total = out["loss_pje"] + out["loss_pcpe"] + out["loss_r"]
    np.testing.assert_allclose(out["loss"], total, rtol=1e-6)
    assert all(np.isfinite(float(out[k])) for k in ("loss_pje", "loss_pcpe", "loss_r"))
    # clips 0..2 are the prototypes of granularity 0: their targets point at themselves
    np.testing.assert_array_equal(targets[0, :3], [0, 1, 2])
    encoder_only = run(state, key, False)
    assert float(encoder_only["loss_r"]) == 0 and float(encoder_only["loss_pcpe"]) == 0
    assert float(encoder_only["loss"]) == pytest.approx(float(out["loss_pje"]), rel=1e-6)
    # eq. (1) is the visible-audio stream against the visual prototypes
    key_a, key_v = jax.random.split(key)
    noise_a = jax.random.uniform(key_a, (4, 32))
    noise_v = jax.random.uniform(key_v, (4, 16))
    _, stream_a, _, _, _ = model.forward_encoder(
        model.audio_patches(audio), model.visual_patches(image), noise_a, noise_v, 0.5, 0.75
    )
    expected = losses.pje_loss(
        stream_a.mean(1), protos["visual"], protos["gamma"], targets, protos["valid"], 0.1
    )
    assert float(out["loss_pje"]) == pytest.approx(float(expected), rel=1e-5)


def test_ablation_weights_remove_their_equation_from_the_total(setup):
    model, state, run, audio, image, protos, targets = setup
    key = jax.random.key(1)
    full = run(state, key, True)
    for weights, kept in (
        ((0.0, 1.0), ("loss_pcpe", "loss_r")),
        ((1.0, 0.0), ("loss_pje", "loss_r")),
    ):
        out = nnx.merge(*nnx.split(model))(
            audio, image, protos, targets, key=key, pje_weight=weights[0], pcpe_weight=weights[1]
        )
        for name in ("loss_pje", "loss_pcpe", "loss_r"):  # every term is still reported
            assert float(out[name]) == pytest.approx(float(full[name]), rel=1e-5)
        expected = sum(float(full[name]) for name in kept)
        assert float(out["loss"]) == pytest.approx(expected, rel=1e-5)


PCAV_DEFAULTS = dict(
    tau=0.1,
    scale="paper",
    pje_weight=1.0,
    pcpe_weight=1.0,
    symmetric_pje=False,
    infonce="off",
    infonce_weight=0.1,
)
CONFIGURATIONS = [
    *(
        (phase, dict(symmetric_pje=symmetric, infonce=infonce))
        for phase in PHASES
        for symmetric in (False, True)
        for infonce in ("off", "always")
    ),
    ("warmup", dict(infonce="warmup")),
    ("decoder", dict(infonce="warmup")),
    ("decoder", dict(pje_weight=0.0)),
    ("decoder", dict(pcpe_weight=0.0)),
    ("decoder", dict(scale="pcl")),
]


@pytest.mark.parametrize(("phase", "changes"), CONFIGURATIONS)
def test_exactly_the_parameters_a_configuration_leaves_untrained_get_no_gradient(
    setup, phase, changes
):
    """Every trainable parameter of every phase and option gets a gradient, except those
    ``untrained`` names (and documents) for that configuration."""
    import fnmatch

    import ml_collections

    from cavmae_jax.train.pcav import phase_settings, untrained

    model, _, _, audio, image, protos, targets = setup
    pcav = ml_collections.ConfigDict({**PCAV_DEFAULTS, **changes})
    settings = phase_settings(pcav, phase)
    use_decoder = settings.pop("use_decoder")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        out = nnx.merge(graphdef, params, rest)(
            audio,
            image,
            protos,
            targets,
            key=jax.random.key(0),
            use_decoder=use_decoder,
            **settings,
        )
        return out["loss"]

    grads = jax.jit(jax.grad(loss))(params)
    zero = {
        ".".join(map(str, path))
        for path, g in nnx.to_flat_state(grads)
        if not np.any(np.asarray(g[...]))
    }
    names = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(params)}
    expected = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in untrained(pcav, phase))}
    assert zero == expected, (sorted(zero - expected), sorted(expected - zero))
    trained_visual = any(n.startswith("blocks_u") and "norm1_v" in n for n in names - zero)
    assert trained_visual == (
        settings["infonce_weight"] > 0
        or (settings["use_prototypes"] and settings["pje_weight"] > 0 and pcav.symmetric_pje)
    )


def test_phases_follow_the_warmup_and_the_order_and_the_momentum_its_half_life(capsys):
    import ml_collections

    from cavmae_jax.train.pcav import momentum_summary, phase_ends, resolved_momentum

    durations = Durations(clips=150, batch_size=10, steps_per_epoch=15, num_steps=300)
    pcav = ml_collections.ConfigDict(
        dict(
            warmup_epochs=2,
            decoder_epochs=10,
            decoder_first=True,
            ema_half_life_epochs=2.0,
            ema_momentum=0.999,
        )
    )
    assert phase_ends(pcav, durations) == [("warmup", 30), ("decoder", 180), ("encoders", 300)]
    pcav.decoder_first = False
    assert phase_ends(pcav, durations) == [("warmup", 30), ("encoders", 150), ("decoder", 300)]
    momentum = resolved_momentum(pcav, durations)
    assert momentum**30 == pytest.approx(0.5)  # half-life 2 epochs of 15 updates
    line = momentum_summary(momentum, durations)
    assert line.startswith(f"momentum encoder: momentum {momentum:.6g}, half-life 30 updates")
    assert "fits this run" not in line
    pcav.ema_half_life_epochs = 0.0
    assert resolved_momentum(pcav, durations) == 0.999
    slow = momentum_summary(0.999, durations)
    assert "half-life 692.8 updates" in slow and "still 74% their initial values" in slow


def test_momentum_update_and_saved_model_round_trip(tmp_path):
    ema = {"w": jnp.ones(3)}
    new = ema_update(ema, {"w": jnp.zeros(3)}, 0.99)
    np.testing.assert_allclose(new["w"], 0.99)
    model = PCAVMAE(small(), nnx.Rngs(0))
    convert.save_model(model, tmp_path / "m")
    loaded = convert.load_model(tmp_path / "m")
    assert isinstance(loaded, PCAVMAE)
    audio, image = random_inputs(model.cfg, 2)
    np.testing.assert_allclose(
        unit(loaded.clip_embeddings(audio, image)[0]),
        model.clip_embeddings(audio, image)[0],
        rtol=1e-6,
    )


def test_training_step_moves_the_momentum_encoder_once_per_update(setup):
    """ema' = m * ema + (1 - m) * params' after the optimizer update, once per update also when
    the batch is split into two micro-batches; the clustered features (hence the targets) come
    from the momentum encoder, not from the trained one."""
    import ml_collections
    import optax

    from cavmae_jax.train.pcav import PCAVPretraining, pcav_loss
    from cavmae_jax.train.steps import make_train_step

    model, _, _, audio, image, protos, _ = setup
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(jnp.copy, params)  # the step donates its state
    tx = optax.sgd(0.1)
    ema = jax.tree.map(lambda p: p + 0.01, params)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "rest": rest,
        "opt_state": tx.init(params),
        "ema": ema,
        "protos": protos,
    }
    config = ml_collections.ConfigDict({"pcav": {"ema_momentum": 0.9, "ema_half_life_epochs": 0}})
    momentum = PCAVPretraining().after_update(config, Durations(8, 4, 2, 10))
    step = make_train_step(
        pcav_loss(graphdef, {}, True),
        tx,
        lambda count: 0.1,
        seed=0,
        grad_accum=2,
        after_update=momentum,
    )
    keep = jax.tree.map(np.array, {"params": params, "ema": ema})
    new, metrics = step(state, {"audio": audio, "image": image})
    moved = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, keep["ema"], new["params"])
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new["ema"], moved
    )
    changed = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), new["params"], keep["params"])
    assert max(jax.tree.leaves(changed)) > 0 and 0 <= float(metrics["p_acc"]) <= 1
    assert int(new["step"]) == 1


PCAV_STEPS = 6


def pcav_command(workdir, dataset) -> list[str]:
    """6 updates of 4 clips, prototypes refreshed every 2 updates, checkpoints every 2."""
    from runs import pretrain_command

    return pretrain_command(
        workdir,
        dataset,
        PCAV_STEPS,
        "--config.pcav.refresh.every_steps=2",
        config="configs/pcav.py:demo",
    )


def final_run_state(workdir) -> dict[str, np.ndarray]:
    """Parameters, momentum parameters and prototypes of the run's last checkpoint."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(workdir / "checkpoints" / str(PCAV_STEPS) / "state")
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            {k: state[k] for k in ("params", "ema", "protos")}
        )
    }


def test_sigkilled_pcav_run_resumes_to_the_same_parameters_momentum_and_prototypes(tmp_path):
    """Killed after update 3 (the last checkpoint holds update 2, after a refresh): the resumed
    run repeats update 3, refreshes at 4 and 6, and ends bit for bit where an uninterrupted one
    ends."""
    import signal
    import subprocess

    from runs import ROOT, logged_steps, start_and_stop

    from input_pipeline import prepare, synthetic

    clips = synthetic.generate(tmp_path / "videos", clips=12, classes=4, seed=5)
    dataset = tmp_path / "ds"
    prepare.prepare(clips, dataset, labels=tmp_path / "videos" / "labels.csv", progress=False)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    subprocess.run(pcav_command(straight, dataset), cwd=ROOT, check=True, capture_output=True)
    start_and_stop(pcav_command(resumed, dataset), resumed, 3, signal.SIGKILL)
    assert not (resumed / "model").exists()
    subprocess.run(pcav_command(resumed, dataset), cwd=ROOT, check=True, capture_output=True)
    assert logged_steps(resumed) == logged_steps(straight) == list(range(PCAV_STEPS + 1))
    expected, final = final_run_state(straight), final_run_state(resumed)
    assert any("protos" in name for name in expected) and any("ema" in name for name in expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(final[name], value, err_msg=name)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    from input_pipeline import prepare, synthetic

    root = tmp_path_factory.mktemp("pcav-init")
    clips = synthetic.generate(root / "videos", clips=8, classes=4, seed=7)
    prepare.prepare(clips, root / "ds", labels=root / "videos" / "labels.csv", progress=False)
    return root / "ds"


def _encoder_leaves(model) -> dict:
    """Every parameter that is not the decoder's or the prototype projections'."""
    own = PCAVPretraining.own_layers
    return {
        path: np.asarray(v[...])
        for path, v in nnx.to_flat_state(nnx.state(model))
        if path[0] not in own
    }


def test_pcav_starts_from_an_official_cavmae_file_and_names_the_layers_it_keeps(
    small_dataset, tmp_path, capsys
):
    """A CAV-MAE with its own (wider, deeper) decoder, as an official .pth: the encoder is
    copied; the decoder and the prototype projections keep their initialisation, each named."""
    from cavmae_jax import cli
    from cavmae_jax.configs.common import TINY_MODEL
    from cavmae_jax.models import CAVMAE, ModelConfig

    source = CAVMAE(
        ModelConfig(**{**TINY_MODEL, "decoder_embed_dim": 48, "decoder_depth": 3}), nnx.Rngs(5)
    )
    convert.save_pth(source, tmp_path / "cav_mae.pth")
    workdir = tmp_path / "run"
    cli.main(
        [
            "pretrain",
            "--config",
            "configs/pcav.py:demo",
            "--workdir",
            str(workdir),
            f"--config.data.dir={small_dataset}",
            f"--config.init={tmp_path / 'cav_mae.pth'}",
            "--config.num_steps=1",
            "--config.batch_size=4",
        ]
    )
    out = capsys.readouterr().out
    kept = re.findall(r"init: (\w+): not in \S+, keeps its initialisation", out)
    assert set(kept) == {
        "proto_proj_a",
        "proto_proj_v",
        "mask_token",
        "decoder_embed",
        "decoder_blocks",
        "decoder_norm",
        "decoder_pred_a",
        "decoder_pred_v",
        "decoder_modality_a",
        "decoder_modality_v",
        "decoder_pos_embed_a",
        "decoder_pos_embed_v",
    }
    assert (workdir / "model").exists()


def test_pcav_init_from_a_model_directory_copies_every_shared_parameter(
    small_dataset, tmp_path, capsys
):
    from cavmae_jax.config_loading import load_config
    from cavmae_jax.models import CAVMAE, ModelConfig
    from cavmae_jax.train.setup import build

    config = load_config("configs/pcav.py:demo")
    config.data.dir, config.batch_size = str(small_dataset), 4
    cfg = PCAVPretraining().model_config(config)
    source = CAVMAE(
        ModelConfig(**{**config.model.to_dict(), "contrast_loss_weight": 1.0}), nnx.Rngs(9)
    )
    convert.save_model(source, tmp_path / "cavmae")
    config.init = str(tmp_path / "cavmae")
    setup, state = build(config, tmp_path / "run")
    out = capsys.readouterr().out
    assert re.findall(r"init: (\w+): not in", out) == ["proto_proj_a", "proto_proj_v"]
    model = setup.model(state["params"], state["rest"])
    copied = _encoder_leaves(model)
    expected = _encoder_leaves(source)
    assert (
        copied.keys() == expected.keys() and cfg.decoder_embed_dim == source.cfg.decoder_embed_dim
    )
    for path, value in expected.items():
        np.testing.assert_array_equal(copied[path], value, str(path))
    decoder = nnx.to_flat_state(nnx.state(model.decoder_blocks))
    reference = dict(nnx.to_flat_state(nnx.state(source.decoder_blocks)))
    for path, value in decoder:  # the same decoder sizes: copied too
        np.testing.assert_array_equal(value[...], reference[path][...])


def test_infonce_under_accumulation_asks_which_negatives(tmp_path):
    """PCAV-MAE takes InfoNCE per micro-batch only: with grad_accum > 1 the run refuses unless
    ``contrast_over=micro_batch`` says so; then it builds its phases."""
    from cavmae_jax.config_loading import load_config
    from cavmae_jax.errors import UserError
    from cavmae_jax.train.pcav import PCAVPretraining

    config = load_config("configs/pcav.py:demo")
    config.pcav.infonce, config.grad_accum = "always", 2
    durations = Durations(clips=150, batch_size=10, steps_per_epoch=15, num_steps=300)
    with pytest.raises(UserError, match="contrast_over=micro_batch"):
        PCAVPretraining().loss_phases(None, config, durations)
    config.contrast_over = "micro_batch"
    assert len(PCAVPretraining().loss_phases(None, config, durations)) == 3
