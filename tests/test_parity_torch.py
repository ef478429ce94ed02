"""Our models with converted weights equal an independent PyTorch rendering of the official math."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch_reference as ref
from conftest import random_inputs, random_state_dict

from cavmae_jax import convert
from cavmae_jax.models import FT_MODES, tiny

TOL = dict(rtol=1e-5, atol=1e-5)


def to_nchw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(0, 3, 1, 2).contiguous()


def close(ours, theirs):
    np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), **TOL)


def paired(kind: str, cfg, seed: int):
    """Our model and the PyTorch reference holding the same random official state dict."""
    sd = random_state_dict(kind, cfg, seed)
    switches = (
        "num_mel_bins",
        "num_heads",
        "decoder_num_heads",
        "norm_pix_loss",
        "bidirect_contrast",
    )
    ours = convert.from_torch_state_dict(sd, **{name: getattr(cfg, name) for name in switches})
    theirs = ref.CAVMAE(cfg) if kind == "CAVMAE" else ref.CAVMAEFT(cfg, kind == "CAVMAEFT")
    ref.load_numpy_state(theirs, sd)
    return ours, theirs


def pretraining_outputs(theirs, audio, image, noise_a, noise_v, ratios=(0.75, 0.75)):
    with torch.no_grad():
        return theirs(
            torch.from_numpy(audio),
            to_nchw(image),
            torch.from_numpy(noise_a),
            torch.from_numpy(noise_v),
            *ratios,
        )


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"norm_pix_loss": True},
        {"depth": 4, "modality_specific_depth": 2},  # two shared layers: the unchained quirk
        {"bidirect_contrast": True},
    ],
)
@pytest.mark.parametrize("ratios", [(0.75, 0.75), (0.5, 0.65)])
def test_pretraining_outputs_match_torch(changes, ratios):
    cfg = tiny(**changes)
    ours, theirs = paired("CAVMAE", cfg, seed=0)
    audio, image = random_inputs(cfg, batch=4)
    rng = np.random.default_rng(1)
    noise_a = rng.random((4, 32)).astype(np.float32)
    noise_v = rng.random((4, 16)).astype(np.float32)
    out = ours(
        audio,
        image,
        noise_a=noise_a,
        noise_v=noise_v,
        mask_ratio_a=ratios[0],
        mask_ratio_v=ratios[1],
    )
    for name, value in pretraining_outputs(theirs, audio, image, noise_a, noise_v, ratios).items():
        close(out[name], value)


def test_structured_noise_matches_torch():
    """The 1.1-forced noise of a time mask drives both implementations to the same outputs."""
    cfg = tiny()
    ours, theirs = paired("CAVMAE", cfg, seed=3)
    audio, image = random_inputs(cfg, batch=2, seed=2)
    noise_a = np.random.default_rng(0).random((2, 4, 8)).astype(np.float32)
    noise_a[0, :, [1, 5]] = 1.1
    noise_a[1, :, [0, 7]] = 1.1
    noise_a = noise_a.reshape(2, 32)
    noise_v = np.random.default_rng(1).random((2, 16)).astype(np.float32)
    out = ours(audio, image, noise_a=noise_a, noise_v=noise_v)
    expected = pretraining_outputs(theirs, audio, image, noise_a, noise_v)
    close(out["loss"], expected["loss"])
    close(out["mask_a"], expected["mask_a"])


@pytest.mark.parametrize("kind", ["CAVMAE", "CAVMAEFT"])
def test_features_match_torch(kind):
    cfg = tiny(tr_pos=kind != "CAVMAE")
    ours, theirs = paired(kind, cfg, seed=5)
    audio, image = random_inputs(cfg, batch=3)
    feat_a, feat_v = ours.forward_feat(audio, image)
    with torch.no_grad():
        exp_a, exp_v = theirs.feat(torch.from_numpy(audio), to_nchw(image))
    close(feat_a, exp_a)
    close(feat_v, exp_v)
    if kind == "CAVMAEFT":
        close(ours.forward_feat(audio, image, mode="a"), exp_a)


@pytest.mark.parametrize("mode", FT_MODES)
def test_finetuning_logits_match_torch(mode):
    cfg = tiny(tr_pos=True)
    ours, theirs = paired("CAVMAEFT", cfg, seed=7)
    audio, image = random_inputs(cfg, batch=3, seed=4)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(audio), to_nchw(image), mode)
    close(ours(audio, image, mode=mode), expected)


def test_audio_only_classifier_matches_torch():
    cfg = tiny(tr_pos=True)
    ours, theirs = paired("CAVMAEFTAudio", cfg, seed=9)
    audio, _ = random_inputs(cfg, batch=2)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(audio), None, "audioonly")
    close(ours(audio), expected)
