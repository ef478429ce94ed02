"""Conversion: official name sets, exact round trips, safe .pth reading, Orbax, MAE init."""

from __future__ import annotations

import io
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch
from conftest import DATA, random_inputs, random_state_dict
from flax import nnx

from cavmae_jax import convert
from cavmae_jax.models import CAVMAE, CAVMAEFT, CAVMAEFTAudio, ModelConfig, tiny
from cavmae_jax.pth import CheckpointError, load_pth

REFERENCE = {
    "CAVMAE": "state_dict_cavmae.json",
    "CAVMAEFT": "state_dict_cavmaeft.json",
    "CAVMAEFTAudio": "state_dict_cavmaeftaudio.json",
}
# The official depths (11 + 1 encoder, 8 decoder) at small widths: the same names as the JSON.
SMALL_OFFICIAL = tiny(depth=12, modality_specific_depth=11, decoder_depth=8, tr_pos=True)


def official_names(kind):
    return json.loads((DATA / REFERENCE[kind]).read_text())


@pytest.mark.parametrize("kind", list(REFERENCE))
def test_full_size_names_shapes_and_order_equal_the_official(kind):
    expected = official_names(kind)
    model = convert._abstract(kind, ModelConfig(tr_pos=kind != "CAVMAE"))
    shapes = convert.official_shapes(model)
    assert list(shapes) == list(expected)
    assert {name: list(shape) for name, shape in shapes.items()} == expected


@pytest.mark.parametrize("kind", list(REFERENCE))
def test_round_trip_is_exact_for_each_official_name_set(kind):
    sd = random_state_dict(kind, SMALL_OFFICIAL, seed=1)
    model = convert.from_torch_state_dict(sd, num_mel_bins=16, num_heads=4, decoder_num_heads=2)
    back = convert.to_torch_state_dict(model)
    assert list(back) == list(official_names(kind))
    for name, value in sd.items():
        assert back[name].dtype == np.float32
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_sizes_are_inferred_from_shapes():
    sd = random_state_dict("CAVMAE", SMALL_OFFICIAL)
    cfg = convert.from_torch_state_dict(sd, num_mel_bins=16).cfg
    assert (cfg.embed_dim, cfg.modality_specific_depth, cfg.depth) == (32, 11, 12)
    assert (cfg.decoder_embed_dim, cfg.decoder_depth, cfg.patch_size) == (16, 8, 4)
    assert (cfg.audio_length, cfg.img_size, cfg.tr_pos) == (32, 16, False)
    ft = convert.from_torch_state_dict(
        random_state_dict("CAVMAEFT", SMALL_OFFICIAL), num_mel_bins=16
    )
    assert isinstance(ft, CAVMAEFT) and ft.cfg.label_dim == 5 and ft.cfg.tr_pos


def test_module_prefix_is_stripped_and_kind_inferred():
    sd = random_state_dict("CAVMAEFTAudio", tiny(tr_pos=True))
    prefixed = {"module." + k: v for k, v in sd.items()}
    model = convert.from_torch_state_dict(prefixed, num_mel_bins=16, num_heads=4)
    assert isinstance(model, CAVMAEFTAudio)


def test_finetuned_position_tables_are_loaded_not_regenerated():
    sd = random_state_dict("CAVMAEFT", tiny(tr_pos=True))
    model = convert.from_torch_state_dict(sd, num_mel_bins=16, num_heads=4)
    np.testing.assert_array_equal(np.asarray(model.pos_embed_a[...]), sd["pos_embed_a"])
    assert isinstance(model.pos_embed_a, nnx.Param)  # trainable, as the official finetuning


def test_pretraining_positions_are_stored_but_not_trainable():
    model = convert.from_torch_state_dict(random_state_dict("CAVMAE", tiny()), num_mel_bins=16)
    assert not isinstance(model.pos_embed_a, nnx.Param)
    assert "pos_embed_a" in convert.to_torch_state_dict(model)
    trainable = {convert.torch_name(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert not {"pos_embed_a", "pos_embed_v", "decoder_pos_embed_a"} & trainable


def test_shape_mismatch_and_missing_keys_are_reported():
    sd = random_state_dict("CAVMAEFT", tiny(tr_pos=True))
    bad = dict(sd)
    bad["norm_a.weight"] = np.ones(7, np.float32)
    with pytest.raises(CheckpointError, match="norm_a.weight has shape"):
        convert.from_torch_state_dict(bad, num_mel_bins=16, num_heads=4)
    del sd["norm.bias"]
    with pytest.raises(CheckpointError, match="missing.*norm.bias"):
        convert.from_torch_state_dict(sd, num_mel_bins=16, num_heads=4)


def test_pretrained_checkpoint_loads_non_strictly_into_finetuning_model():
    """As the official finetuning init: head fresh, decoder ignored, encoder copied."""
    sd = random_state_dict("CAVMAE", tiny())
    ft = convert.from_torch_state_dict(
        sd, kind="CAVMAEFT", strict=False, num_mel_bins=16, num_heads=4
    )
    assert isinstance(ft, CAVMAEFT)
    np.testing.assert_array_equal(
        np.asarray(ft.blocks_u.layers.attn.qkv.kernel[...])[0], sd["blocks_u.0.attn.qkv.weight"].T
    )
    np.testing.assert_array_equal(np.asarray(ft.mlp_head[0].scale[...]), np.ones(32))


def test_real_torch_file_loads_and_matches(tmp_path):
    cfg = tiny(tr_pos=True)
    sd = random_state_dict("CAVMAEFT", cfg, seed=4)
    path = tmp_path / "as-20k.pth"
    torch.save({"module." + k: torch.from_numpy(v) for k, v in sd.items()}, path)
    model = convert.model_from_pth(path, num_mel_bins=16, num_heads=4)
    back = convert.to_torch_state_dict(model)
    for name, value in sd.items():
        np.testing.assert_array_equal(back[name], value)


def test_pth_reader_handles_views_dtypes_and_nested_dicts(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    obj = {"model": {"t": base.t(), "s": base[1:, 2:4], "h": base.half(), "i": torch.arange(5)}}
    torch.save(obj, tmp_path / "x.pth")
    got = load_pth(tmp_path / "x.pth")["model"]
    for name, tensor in obj["model"].items():
        np.testing.assert_array_equal(got[name], tensor.numpy())
        assert got[name].dtype == tensor.numpy().dtype


def test_written_pth_loads_in_torch(tmp_path):
    model = CAVMAEFT(tiny(tr_pos=True), nnx.Rngs(0))
    convert.save_pth(model, tmp_path / "out.pth")
    loaded = torch.load(tmp_path / "out.pth", weights_only=True)
    ours = convert.to_torch_state_dict(model)
    assert list(loaded) == ["module." + k for k in ours]
    for name, value in ours.items():
        np.testing.assert_array_equal(loaded["module." + name].numpy(), value)


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.target}",))


def _zip_with_pickle(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", "little")


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    _zip_with_pickle(path, pickle.dumps({"w": _Exploit(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match=r"evil\.pth.*refusing to load 'posix\.system'"):
        convert.model_from_pth(path)
    assert not marker.exists()
    # the same payload as a legacy (non-zip) pickle file is refused before unpickling
    raw = tmp_path / "raw.pth"
    raw.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(CheckpointError, match="not a PyTorch zip checkpoint"):
        load_pth(raw)
    assert not marker.exists()


def test_out_of_bounds_tensor_view_is_refused(tmp_path):
    buffer = io.BytesIO()
    torch.save({"t": torch.zeros(4)}, buffer)
    good = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    prefix = [n for n in good.namelist() if n.endswith("data.pkl")][0][: -len("data.pkl")]
    pkl = good.read(prefix + "data.pkl").replace(b"K\x04\x85", b"K\x40\x85")  # size 4 -> 64
    with zipfile.ZipFile(tmp_path / "big.pth", "w") as archive:
        for name in good.namelist():
            archive.writestr(name, pkl if name.endswith("data.pkl") else good.read(name))
    with pytest.raises(CheckpointError, match="outside its storage"):
        load_pth(tmp_path / "big.pth")


def test_orbax_checkpoint_round_trip(tmp_path):
    model = CAVMAE(tiny(), nnx.Rngs(3))
    convert.save_model(model, tmp_path / "ckpt")
    restored = convert.load_model(tmp_path / "ckpt")
    assert isinstance(restored, CAVMAE) and restored.cfg == model.cfg
    a, b = convert.to_torch_state_dict(model), convert.to_torch_state_dict(restored)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    audio, image = random_inputs(model.cfg, 2)
    feats = model.forward_feat(audio, image)[0], restored.forward_feat(audio, image)[0]
    np.testing.assert_array_equal(np.asarray(feats[0]), np.asarray(feats[1]))
    with pytest.raises(CheckpointError, match="no model.json"):
        convert.load_model(tmp_path)


def fake_mae_checkpoint(dim=32, dec=16, patch=4, blocks=12, dec_blocks=8, grid=4):
    """An ImageNet-MAE-shaped state dict (ViT encoder with cls token, MAE decoder)."""
    rng = np.random.default_rng(0)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    block = lambda d: {  # noqa: E731
        "norm1.weight": r(d),
        "norm1.bias": r(d),
        "attn.qkv.weight": r(3 * d, d),
        "attn.qkv.bias": r(3 * d),
        "attn.proj.weight": r(d, d),
        "attn.proj.bias": r(d),
        "norm2.weight": r(d),
        "norm2.bias": r(d),
        "mlp.fc1.weight": r(4 * d, d),
        "mlp.fc1.bias": r(4 * d),
        "mlp.fc2.weight": r(d, 4 * d),
        "mlp.fc2.bias": r(d),
    }
    sd = {
        "cls_token": r(1, 1, dim),
        "pos_embed": r(1, grid * grid + 1, dim),
        "patch_embed.proj.weight": r(dim, 3, patch, patch),
        "patch_embed.proj.bias": r(dim),
        "norm.weight": r(dim),
        "norm.bias": r(dim),
        "mask_token": r(1, 1, dec),
        "decoder_embed.weight": r(dec, dim),
        "decoder_embed.bias": r(dec),
        "decoder_pos_embed": r(1, grid * grid + 1, dec),
        "decoder_norm.weight": r(dec),
        "decoder_norm.bias": r(dec),
        "decoder_pred.weight": r(patch * patch * 3, dec),
        "decoder_pred.bias": r(patch * patch * 3),
    }
    for i in range(blocks):
        sd.update({f"blocks.{i}.{k}": v for k, v in block(dim).items()})
    for i in range(dec_blocks):
        sd.update({f"decoder_blocks.{i}.{k}": v for k, v in block(dec).items()})
    return {"model": sd}


def test_imagenet_mae_initialisation_follows_adapt_vmae_weights():
    mae = fake_mae_checkpoint()
    m = mae["model"]
    cfg = dict(tiny(depth=12, modality_specific_depth=11, decoder_depth=8).__dict__)
    model = convert.mae_imagenet_init(mae, seed=0, **cfg)
    sd = convert.to_torch_state_dict(model)
    eq = np.testing.assert_array_equal
    eq(sd["blocks_a.3.attn.qkv.weight"], m["blocks.3.attn.qkv.weight"])
    eq(sd["blocks_v.10.mlp.fc2.bias"], m["blocks.10.mlp.fc2.bias"])
    eq(sd["blocks_u.0.attn.proj.weight"], m["blocks.11.attn.proj.weight"])
    for norm in ("norm1", "norm1_a", "norm1_v"):
        eq(sd[f"blocks_u.0.{norm}.weight"], m["blocks.11.norm1.weight"])
    eq(sd["blocks_a.0.norm1_a.weight"], np.ones(32))  # branch _a/_v norms stay 1/0
    for norm in ("norm", "norm_a", "norm_v"):
        eq(sd[f"{norm}.bias"], m["norm.bias"])
    eq(sd["pos_embed_v"], m["pos_embed"][:, 1:])
    eq(sd["decoder_pos_embed_v"], m["decoder_pos_embed"][:, 1:])
    from cavmae_jax.models.posemb import sincos_2d

    eq(sd["pos_embed_a"][0], sincos_2d(32, 4, 8))
    eq(sd["patch_embed_a.proj.weight"], m["patch_embed.proj.weight"].sum(1, keepdims=True))
    eq(sd["patch_embed_v.proj.weight"], m["patch_embed.proj.weight"])
    eq(sd["decoder_pred_a.weight"], m["decoder_pred.weight"][:16])
    eq(sd["decoder_pred_v.bias"], m["decoder_pred.bias"])
    eq(sd["decoder_blocks.7.mlp.fc1.weight"], m["decoder_blocks.7.mlp.fc1.weight"])
    eq(sd["decoder_blocks.2.norm2_v.weight"], np.ones(16))
    eq(sd["mask_token"], m["mask_token"])
    assert 0.005 < sd["modality_a"].std() < 0.05  # random N(0, 0.02)


@pytest.mark.parametrize("kind", list(REFERENCE))
def test_full_size_config_is_inferred_from_the_official_shapes(kind):
    shapes = official_names(kind)
    placeholders = {name: np.broadcast_to(np.float32(0), shape) for name, shape in shapes.items()}
    cfg = convert.infer_config(placeholders, kind)
    default = ModelConfig()
    assert (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.modality_specific_depth) == (
        768,
        12,
        12,
        11,
    )
    assert (cfg.audio_length, cfg.num_mel_bins, cfg.img_size, cfg.mlp_ratio) == (
        1024,
        128,
        224,
        4.0,
    )
    if kind == "CAVMAE":
        assert cfg == default  # decoder 512 wide, 8 deep, 16 heads of 32; fixed positions
    else:
        assert cfg.label_dim == 527 and cfg.tr_pos


def test_export_keeps_the_encoder_and_drops_the_decoder(tmp_path):
    from cavmae_jax import cli

    pretrained = CAVMAE(tiny(num_heads=4), nnx.Rngs(1))
    convert.save_model(pretrained, tmp_path / "pre")
    cli.main(["export", str(tmp_path / "pre"), str(tmp_path / "ft"), "--label-dim", "7"])
    exported = convert.load_model(tmp_path / "ft")
    assert isinstance(exported, CAVMAEFT) and exported.cfg.label_dim == 7 and exported.cfg.tr_pos
    ours, theirs = convert.to_torch_state_dict(exported), convert.to_torch_state_dict(pretrained)
    assert not any(name.startswith("decoder") for name in ours)
    for name, value in ours.items():
        if not name.startswith("mlp_head"):
            np.testing.assert_array_equal(value, theirs[name])
    audio, image = random_inputs(tiny(), 2)
    np.testing.assert_allclose(
        np.asarray(exported.forward_feat(audio, image)[0]),
        np.asarray(pretrained.forward_feat(audio, image)[0]),
        rtol=1e-6,
        atol=1e-6,
    )
