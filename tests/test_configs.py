"""Recipe configs: every variant loads, builds a valid model config, and matches the spec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cavmae_jax import cli
from cavmae_jax.config_loading import load_config
from cavmae_jax.models import ModelConfig

PRETRAIN = str(Path(__file__).resolve().parents[1] / "configs" / "pretrain.py")
VARIANTS = ["as-base", "as-scale+", "as-scale++", "vgg", "vgg-from-as", "avmae", "cav",
            "mask-time", "mask-freq", "mask-tf", "mask-50", "mask-65", "mask-85"]  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS + [v + ",tiny" for v in VARIANTS])
def test_every_variant_builds(variant):
    config = load_config(f"{PRETRAIN}:{variant}")
    ModelConfig(**config.model.to_dict())
    assert config.num_steps % config.steps_per_epoch == 0


@pytest.mark.parametrize(
    "variant,steps,lr",
    [("as-base", 36_917, 5e-5), ("as-scale+", 14_766, 1e-4), ("as-scale++", 6_921, 2e-4),
     ("vgg", 1_531, 1e-4), ("vgg-from-as", 1_531, 5e-5)],
)  # fmt: skip
def test_recipes_match_the_official_iteration_counts(variant, steps, lr):
    config = load_config(f"{PRETRAIN}:{variant}")
    assert config.steps_per_epoch == steps and config.lr == lr
    assert (config.lr_decay_start, config.lr_decay_every, config.lr_decay) == (10, 5, 0.5)


def test_ablation_switches():
    assert load_config(f"{PRETRAIN}:avmae").model.modality_specific_depth == 0
    assert load_config(f"{PRETRAIN}:cav").model.decoder_depth == 0
    assert load_config(f"{PRETRAIN}:mask-tf").mask_mode == "tf"
    assert load_config(f"{PRETRAIN}:mask-65").mask_ratio_a == 0.65
    with pytest.raises(ValueError, match="unknown recipe"):
        load_config(f"{PRETRAIN}:as-huge")


def test_tiny_contrastive_only_variant_trains(tmp_path):
    """The contrastive-only ablation (no decoder) trains (8 clips, 2 steps: it runs, not learns)."""
    cli.main(["pretrain", "--config", f"{PRETRAIN}:cav,tiny", "--workdir", str(tmp_path),
              "--config.data.clips=8", "--config.batch_size=4", "--config.num_steps=2",
              "--config.log_every=1"])  # fmt: skip
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and lines[0]["loss_mae"] == 0
    assert (tmp_path / "model" / "model.json").exists()


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="set --config.data.dir"):
        cli.main(["pretrain", "--config", f"{PRETRAIN}:as-base", "--workdir", str(tmp_path)])
