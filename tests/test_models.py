"""Model variants by configuration, dtypes, gradients and the contrastive grouping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_inputs
from flax import nnx

from cavmae_jax.models import CAVMAE, CAVMAEFT, tiny


def noises(cfg, batch, seed=0):
    rng = np.random.default_rng(seed)
    la = cfg.audio_grid[0] * cfg.audio_grid[1]
    lv = cfg.visual_grid[0] * cfg.visual_grid[1]
    return rng.random((batch, la)).astype(np.float32), rng.random((batch, lv)).astype(np.float32)


def run(model, batch=4, seed=0, **kwargs):
    audio, image = random_inputs(model.cfg, batch, seed)
    na, nv = noises(model.cfg, batch, seed)
    return model(audio, image, noise_a=na, noise_v=nv, **kwargs)


def test_cavmae_output_shapes(cfg):
    out = run(CAVMAE(cfg, nnx.Rngs(0)))
    assert out["pred_a"].shape == (4, 32, 16) and out["pred_v"].shape == (4, 16, 48)
    assert out["latent"].shape == (4, 8 + 4, 32)
    assert out["latent_c_a"].shape == (4, 8, 32) and out["latent_c_v"].shape == (4, 4, 32)
    assert out["mask_a"].shape == (4, 32) and out["mask_v"].shape == (4, 16)
    total = out["loss_mae_a"] + out["loss_mae_v"] + out["loss_c"]
    np.testing.assert_allclose(out["loss"], total, rtol=1e-6)


def test_vanilla_av_mae_has_joint_encoder_only_and_no_contrast():
    cfg = tiny(modality_specific_depth=0, contrast_loss_weight=0.0)
    model = CAVMAE(cfg, nnx.Rngs(0))
    assert len(model.blocks_a) == 0 and len(model.blocks_u) == 3
    out = run(model)
    assert "latent_c_a" not in out and float(out["loss_c"]) == 0.0
    assert float(out["loss"]) == pytest.approx(float(out["loss_mae"]))


def test_cav_has_no_decoder_and_no_reconstruction():
    model = CAVMAE(tiny(decoder_depth=0), nnx.Rngs(0))
    assert not hasattr(model, "decoder_blocks") and not hasattr(model, "mask_token")
    out = run(model)
    assert "pred_a" not in out and float(out["loss_mae"]) == 0.0
    assert float(out["loss"]) == pytest.approx(float(out["loss_c"])) and float(out["loss"]) > 0


@pytest.mark.parametrize("msd", [0, 1, 2, 3])
def test_every_modality_specific_depth_runs(msd):
    model = CAVMAE(tiny(modality_specific_depth=msd), nnx.Rngs(0))
    assert len(model.blocks_a) == msd and len(model.blocks_u) == 3 - msd
    assert np.isfinite(float(run(model)["loss"]))


def test_chained_shared_blocks_differ_from_the_official_loop():
    cfg = tiny(depth=4, modality_specific_depth=2)
    official = CAVMAE(cfg, nnx.Rngs(0))
    chained = CAVMAE(cfg.replace(chain_shared_blocks=True), nnx.Rngs(0))
    a, b = run(official)["latent_c_a"], run(chained)["latent_c_a"]
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_loss_groups_sum_the_group_losses():
    """G=2 equals two half batches computed separately and summed (the DataParallel loss)."""
    cfg = tiny()
    whole = CAVMAE(cfg.replace(loss_groups=2), nnx.Rngs(0))
    single = CAVMAE(cfg, nnx.Rngs(0))
    audio, image = random_inputs(cfg, 4)
    na, nv = noises(cfg, 4)
    out = whole(audio, image, noise_a=na, noise_v=nv)
    halves = [
        single(audio[s], image[s], noise_a=na[s], noise_v=nv[s]) for s in (slice(0, 2), slice(2, 4))
    ]
    for name in ("loss", "loss_c", "loss_mae_a", "loss_mae_v"):
        np.testing.assert_allclose(out[name], halves[0][name] + halves[1][name], rtol=1e-5)
    np.testing.assert_allclose(out["c_acc"], (halves[0]["c_acc"] + halves[1]["c_acc"]) / 2)


def test_masks_from_key_are_reproducible_and_need_a_source(cfg):
    model = CAVMAE(cfg, nnx.Rngs(0))
    audio, image = random_inputs(cfg, 2)
    first = model(audio, image, key=jax.random.key(5), mask_mode="tf")
    second = model(audio, image, key=jax.random.key(5), mask_mode="tf")
    np.testing.assert_array_equal(first["mask_a"], second["mask_a"])
    with pytest.raises(ValueError, match="noise_a and noise_v, or a PRNG key"):
        model(audio, image)


def test_bfloat16_compute_runs_close_to_float32(cfg):
    f32 = CAVMAE(cfg, nnx.Rngs(0))
    bf16 = CAVMAE(cfg.replace(dtype="bfloat16"), nnx.Rngs(0))
    out32, out16 = run(f32), run(bf16)
    assert out16["pred_a"].dtype == jnp.bfloat16
    assert bf16.blocks_a.layers.attn.qkv.kernel[...].dtype == jnp.float32  # parameters stay float32
    assert float(out16["loss"]) == pytest.approx(float(out32["loss"]), rel=0.05)


def test_jitted_gradients_are_finite_and_skip_fixed_positions(cfg):
    model = CAVMAE(cfg, nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    audio, image = random_inputs(cfg, 4)

    @jax.jit
    def grad_fn(params, rest, key):
        def loss_fn(p):
            return nnx.merge(graphdef, p, rest)(audio, image, key=key)["loss"]

        return jax.grad(loss_fn)(params)

    grads = grad_fn(params, rest, jax.random.key(0))
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert "pos_embed_a" not in grads and "pos_embed_a" in rest
    assert float(jnp.abs(grads["modality_a"]).sum()) > 0


def test_unknown_finetuning_mode_is_an_error_and_the_sum_mode_adds_the_streams(cfg):
    model = CAVMAEFT(cfg, nnx.Rngs(0))
    audio, image = random_inputs(cfg, 2)
    with pytest.raises(ValueError, match="unknown finetuning mode 'audio'"):
        model(audio, image, mode="audio")
    summed = model.pooled(audio, image, "multimodal_sum")
    parts = model.pooled(audio, image, "multimodal") + model.pooled(audio, image, "audioonly")
    parts += model.pooled(audio, image, "videoonly")
    np.testing.assert_allclose(summed, parts, rtol=1e-5, atol=1e-6)


def test_features_are_the_streams_each_mode_pools(cfg):
    """``features``: audio and visual are the official ``forward_feat``; joint is what the
    multimodal classifier pools; an audio-only model gives audio alone."""
    from cavmae_jax.models import CAVMAEFTAudio

    model = CAVMAEFT(cfg, nnx.Rngs(0))
    audio, image = random_inputs(cfg, 2)
    tokens = model.features(audio, image)
    feat_a, feat_v = model.forward_feat(audio, image)
    np.testing.assert_array_equal(tokens["audio"], feat_a)
    np.testing.assert_array_equal(tokens["visual"], feat_v)
    for name, mode in (("joint", "multimodal"), ("audio", "audioonly"), ("visual", "videoonly")):
        pooled = model.pooled(audio, image, mode)
        np.testing.assert_allclose(tokens[name].mean(axis=1), pooled, rtol=1e-5, atol=1e-6)
    assert set(model.features(audio, image, joint=False)) == {"audio", "visual"}
    assert set(CAVMAEFTAudio(cfg, nnx.Rngs(0)).features(audio, None)) == {"audio"}


def test_config_validation():
    with pytest.raises(ValueError, match="modality_specific_depth"):
        tiny(modality_specific_depth=5)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny(audio_length=30)


def test_inputs_of_the_wrong_size_are_reported(cfg):
    """The audio must be exactly target_length frames, the position table's (behaviour 15)."""
    model = CAVMAEFT(cfg, nnx.Rngs(0))
    audio, image = random_inputs(cfg, 1)
    with pytest.raises(ValueError, match=r"audio must be \[batch, 32 frames, 16 mel bins\]"):
        model(audio[:, :30], image)
    with pytest.raises(ValueError, match="image must be NHWC"):
        model(audio, image.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("policy", ["matmuls", "full"])
def test_remat_gives_the_same_gradients_with_fewer_stored_activations(policy):
    """Rematerialisation changes memory, not math: same loss and gradients, and the compiled
    step keeps fewer temporaries (a deeper model so the saved activations dominate)."""
    cfg = tiny(depth=4, modality_specific_depth=3)
    audio, image = random_inputs(cfg, 8)
    na, nv = noises(cfg, 8)

    def grad_fn(remat):
        graphdef, params = nnx.split(CAVMAE(cfg.replace(remat=remat), nnx.Rngs(0)))

        def loss(params):
            return nnx.merge(graphdef, params)(audio, image, noise_a=na, noise_v=nv)["loss"]

        return jax.jit(jax.value_and_grad(loss)).lower(params).compile(), params

    (plain, params), (remat, _) = grad_fn("none"), grad_fn(policy)
    (loss_plain, g_plain), (loss_remat, g_remat) = plain(params), remat(params)
    np.testing.assert_allclose(loss_remat, loss_plain, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_remat, g_plain
    )
    temp = [f.memory_analysis().temp_size_in_bytes for f in (plain, remat)]
    assert temp[1] < temp[0]
