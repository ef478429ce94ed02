"""Recipe configs: every variant loads, builds a valid model config, and matches the spec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cavmae_jax import cli
from cavmae_jax.config_loading import load_config
from cavmae_jax.models import ModelConfig
from cavmae_jax.train import durations

PRETRAIN = str(Path(__file__).resolve().parents[1] / "configs" / "pretrain.py")
VARIANTS = [
    "as-base",
    "as-scale+",
    "as-scale++",
    "vgg",
    "vgg-from-as",
    "avmae",
    "cav",
    "mask-time",
    "mask-freq",
    "mask-tf",
    "mask-50",
    "mask-65",
    "mask-85",
]


@pytest.mark.parametrize("variant", VARIANTS + [v + ",tiny" for v in VARIANTS])
def test_every_variant_builds(variant):
    config = load_config(f"{PRETRAIN}:{variant}")
    ModelConfig(**config.model.to_dict())
    assert config.trainer == "pretrain" and config.epochs > 0 and config.num_steps == 0


EVERY_RECIPE = [
    "demo",
    *(f"pretrain:{v}" for v in VARIANTS + ["as-base,tiny", "avmae,tiny"]),
    *(f"finetune:{v}" for v in ["as20k", "as2m", "vgg", "as20k-audioonly", "as2m,tiny"]),
    *(f"pcav:{v}" for v in ["as", "vgg", "demo", "as,tiny"]),
]


def field_names(config, prefix: str = "") -> set[str]:
    names = set()
    for key, value in config.items():
        if hasattr(value, "items"):
            names |= field_names(value, f"{prefix}{key}.")
        else:
            names.add(prefix + key)
    return names


def test_every_recipe_exposes_the_shared_fields_and_one_trainer_the_same_fields():
    """An override of a shared field (any model field among them) is valid for every recipe,
    and an override valid for one recipe of a trainer is valid for all of them."""
    from cavmae_jax.configs.common import run_config

    fields_by_trainer: dict[str, set] = {}
    for name in EVERY_RECIPE:
        config = load_config(name)
        fields = field_names(config)
        missing = field_names(run_config(config.trainer)) - fields
        assert not missing, (name, missing)
        fields_by_trainer.setdefault(config.trainer, set()).add(frozenset(fields))
    assert set(fields_by_trainer) == {"pretrain", "finetune", "pcav"}
    for trainer, variants in fields_by_trainer.items():
        assert len(variants) == 1, (trainer, set.symmetric_difference(*map(set, variants)))


AUDIOSET_2M, VGGSOUND = 1_772_023, 183_727  # the official training lists' clips


@pytest.mark.parametrize(
    "variant,clips,steps,lr",
    [
        ("as-base", AUDIOSET_2M, 36_917, 5e-5),
        ("as-scale+", AUDIOSET_2M, 14_766, 1e-4),
        ("as-scale++", AUDIOSET_2M, 6_921, 2e-4),
        ("vgg", VGGSOUND, 1_531, 1e-4),
        ("vgg-from-as", VGGSOUND, 1_531, 5e-5),
    ],
)
def test_recipes_on_the_full_lists_match_the_official_iteration_counts(variant, clips, steps, lr):
    config = load_config(f"{PRETRAIN}:{variant}")
    resolved = durations.resolve(config, clips, clips // config.batch_size)
    assert resolved.steps_per_epoch == steps and config.lr == lr
    assert resolved.num_steps == config.epochs * steps
    assert (config.lr_decay_start, config.lr_decay_every, config.lr_decay) == (10, 5, 0.5)


def test_a_partial_dataset_follows_the_recipe_per_epoch():
    """85% of AS-2M (clips gone from YouTube): the lr still halves after epoch 10 of that data."""
    config = load_config(f"{PRETRAIN}:as-base")
    clips = int(0.85 * AUDIOSET_2M)
    resolved = durations.resolve(config, clips, clips // 48)
    schedule = durations.learning_rate(config, resolved)
    first_decay = 10 * (clips // 48)
    assert float(schedule(first_decay - 1)) == pytest.approx(5e-5)
    assert float(schedule(first_decay)) == pytest.approx(2.5e-5)
    assert resolved.num_steps == 25 * (clips // 48)
    assert resolved.summary().startswith(f"{clips} clips, 48 per update -> {clips // 48} updates")


def test_pcav_recipe_warms_up_for_20_epochs_of_updates_and_ends_its_cosine_at_the_last():
    config = load_config(str(Path(PRETRAIN).with_name("pcav.py")) + ":as")
    assert (config.batch_size, config.grad_accum) == (512, 8)
    resolved = durations.resolve(config, AUDIOSET_2M, AUDIOSET_2M // 512)
    per_epoch = AUDIOSET_2M // 512
    assert resolved.num_steps == 400 * per_epoch
    schedule = durations.learning_rate(config, resolved)
    assert float(schedule(20 * per_epoch)) == pytest.approx(2e-4)
    assert float(schedule(20 * per_epoch // 2)) == pytest.approx(1e-4, rel=1e-3)
    assert float(schedule(resolved.num_steps)) == pytest.approx(0, abs=1e-12)
    late, middle = (float(schedule(int(f * resolved.num_steps))) for f in (0.99, 0.6))
    assert 0 < late < middle < 2e-4 and float(schedule(resolved.num_steps - 1)) < 1e-9
    assert durations.schedule_summary(config, resolved) == (
        f"lr: linear warmup over {20 * per_epoch} updates to 0.0002, cosine to 0 at update "
        f"{400 * per_epoch}"
    )


def test_ablation_switches():
    assert load_config(f"{PRETRAIN}:avmae").model.modality_specific_depth == 0
    assert load_config(f"{PRETRAIN}:cav").model.decoder_depth == 0
    assert load_config(f"{PRETRAIN}:mask-tf").mask_mode == "tf"
    assert load_config(f"{PRETRAIN}:mask-65").mask_ratio_a == 0.65
    with pytest.raises(ValueError, match="unknown recipe"):
        load_config(f"{PRETRAIN}:as-huge")
    for recipe in (f"{PRETRAIN}:as-base,tinyy", "finetune:as20k,tiny,x", "pcav:as,small"):
        with pytest.raises(ValueError, match="unknown modifier"):
            load_config(recipe)


def test_tiny_contrastive_only_variant_trains(tmp_path):
    """The contrastive-only ablation (no decoder) trains (8 clips, 2 steps: it runs, not learns)
    on demo data that ``cavmae prepare --demo`` generates."""
    cli.main(["prepare", "--demo", "8", "--output", str(tmp_path / "data")])
    assert (tmp_path / "data" / "videos" / "clips.csv").exists()
    cli.main(
        [
            "pretrain",
            "--config",
            f"{PRETRAIN}:cav,tiny",
            "--workdir",
            str(tmp_path / "run"),
            f"--config.data.dir={tmp_path / 'data'}",
            "--config.batch_size=4",
            "--config.num_steps=2",
            "--config.log_every=1",
        ]
    )
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and lines[0]["loss_mae"] == 0
    assert (tmp_path / "run" / "model" / "model.json").exists()


def test_a_run_without_a_workdir_is_refused_in_one_line():
    from cavmae_jax.errors import UserError
    from cavmae_jax.train.setup import build

    with pytest.raises(UserError, match="a run needs a workdir"):
        build(load_config("demo"))


def test_missing_dataset_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["pretrain", "--config", f"{PRETRAIN}:as-base", "--workdir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "set --config.data.dir" in err
