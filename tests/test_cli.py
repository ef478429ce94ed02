"""The ``cavmae`` command: pretraining with overrides, conversion both ways."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_state_dict

from cavmae_jax import cli, convert
from cavmae_jax.config_loading import apply_overrides, load_config
from cavmae_jax.errors import UserError
from cavmae_jax.models import tiny

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo.py")


def test_overrides_keep_types_and_reject_unknown_fields():
    config = load_config(DEMO)
    apply_overrides(config, ["--config.lr=1", "--config.model.depth=6", "--config.mask_mode=tf"])
    assert config.lr == 1.0 and config.model.depth == 6 and config.mask_mode == "tf"
    with pytest.raises(UserError, match="no field 'nope'"):
        apply_overrides(config, ["--config.nope=1"])
    with pytest.raises(UserError, match="expected int"):
        apply_overrides(config, ["--config.num_steps=abc"])


def test_convert_pth_to_orbax_and_back(tmp_path):
    # Official widths per head (64) so that head counts are inferred without overrides.
    cfg = tiny(embed_dim=128, num_heads=2, num_mel_bins=128, audio_length=16, tr_pos=True)
    sd = random_state_dict("CAVMAEFT", cfg)
    torch.save({"module." + k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "ft.pth")
    cli.main(["convert", str(tmp_path / "ft.pth"), str(tmp_path / "orbax")])
    cli.main(["convert", "--to-torch", str(tmp_path / "orbax"), str(tmp_path / "back.pth")])
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    for name, value in sd.items():
        np.testing.assert_array_equal(back["module." + name].numpy(), value)


@pytest.mark.parametrize("fmt", ["orbax", "pth"])
def test_pretraining_starts_from_given_weights(tmp_path, fmt):
    """``config.init``: an official .pth or one of our model directories (0 steps: unchanged)."""
    from flax import nnx

    from cavmae_jax.models import CAVMAE, ModelConfig

    config = load_config(DEMO)
    initial = CAVMAE(ModelConfig(**config.model.to_dict()), nnx.Rngs(42))
    if fmt == "orbax":
        convert.save_checkpoint(initial, tmp_path / "init")
        source = tmp_path / "init"
    else:
        source = tmp_path / "init.pth"
        convert.save_torch_checkpoint(initial, source)
    cli.main(["prepare", "--demo", "4", "--output", str(tmp_path / "data")])
    cli.main(
        [
            "pretrain",
            "--config",
            DEMO,
            "--workdir",
            str(tmp_path / "run"),
            "--config.epochs=0",
            f"--config.init={source}",
            f"--config.data.dir={tmp_path / 'data'}",
            "--config.batch_size=4",
        ]
    )
    expected = convert.to_torch_state_dict(initial)
    final = convert.to_torch_state_dict(convert.load_checkpoint(tmp_path / "run" / "model"))
    for name, value in expected.items():
        np.testing.assert_array_equal(final[name], value)
