"""The ``cavmae`` command: pretraining with overrides, conversion both ways."""

from __future__ import annotations

import shlex
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
        convert.save_model(initial, tmp_path / "init")
        source = tmp_path / "init"
    else:
        source = tmp_path / "init.pth"
        convert.save_pth(initial, source)
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
    final = convert.to_torch_state_dict(convert.load_model(tmp_path / "run" / "model"))
    for name, value in expected.items():
        np.testing.assert_array_equal(final[name], value)


def readme_commands() -> list[list[str]]:
    """Every command line of the README's shell blocks (continuations joined, comments cut)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = []
    for block in readme.split("```bash\n")[1:]:
        text = block.split("```", 1)[0].replace("\\\n", " ")
        lines += [shlex.split(line.split("#", 1)[0]) for line in text.splitlines()]
    return [words for words in lines if words]


def test_every_readme_command_parses_and_its_overrides_name_real_fields():
    """Each `cavmae` line is accepted by the parser, a training line's recipe loads and each of
    its --config overrides names a field of it; a compile check names a recipe and a slice;
    the set-up lines are Makefile targets and the install line installs this package."""
    from cavmae_jax import tpu

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    seen = set()
    for words in readme_commands():
        seen.add(words[0])
        if words[0] == "cavmae":
            args, overrides = cli.parser().parse_known_args(words[1:])
            if args.command in ("pretrain", "finetune"):
                config = load_config(args.config)
                apply_overrides(config, overrides)
                assert config.trainer == args.command
            else:
                assert not overrides, words
        elif words[0] == "python":
            assert words[1] == "launch/aot_check.py"
            load_config(words[2])
            tpu.parse(words[words.index("--topology") + 1])
        elif words[0] == "make":
            assert f"\n{words[1]}:" in makefile
        else:
            assert words[:2] == ["pip", "install"] and "cavmae-jax[data]" in words[2]
    assert seen == {"make", "pip", "cavmae", "python"}
