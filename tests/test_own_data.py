"""Your own data: class folders or a CSV with label and fold columns -> labels, folds and fbank
statistics; clips without audio per the policy; position tables of another clip length."""

from __future__ import annotations

import csv
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from test_prepare import read_dataset

from cavmae_jax import cli, convert, probe
from cavmae_jax.configs.common import TINY_MODEL
from cavmae_jax.errors import UserError
from cavmae_jax.models import CAVMAE, CAVMAEFT, ModelConfig
from cavmae_jax.models.posemb import fit_table, sincos_2d
from cavmae_jax.train.init_weights import copy_weights
from cavmae_jax.train.trainer import load_weights
from input_pipeline import metadata, synthetic, video

CLASSES, PER_CLASS, FOLDS = 3, 4, 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("own") / "clips"
    synthetic.class_folders(root, classes=CLASSES, per_class=PER_CLASS, seconds=3.0, seed=4)
    # an audio file among them: kept with black frames under --no-video blank
    synthetic.write_clip(
        root / synthetic.class_names(CLASSES)[1] / "voice.mp4", 1, 8, 3.0, video=False
    )
    # a silent video among them: kept with silent audio under --no-audio silent
    synthetic.write_clip(
        root / synthetic.class_names(CLASSES)[0] / "mute.mp4", 0, 9, 3.0, audio=False
    )
    return root


@pytest.fixture(scope="module")
def prepared(folders, tmp_path_factory):
    output = tmp_path_factory.mktemp("own-ds") / "ds"
    cli.main(
        [
            "prepare",
            "--input",
            str(folders),
            "--output",
            str(output),
            "--folds",
            str(FOLDS),
            "--audio-length",
            "512",
            "--no-audio",
            "silent",
            "--no-video",
            "blank",
        ]
    )
    return output


def test_class_folders_give_labels_folds_and_the_clip_length(prepared):
    names = synthetic.class_names(CLASSES)
    rows = list(csv.DictReader((prepared / "labels.csv").read_text().splitlines()))
    assert [r["display_name"] for r in rows] == sorted(names)
    info = metadata.read(prepared)
    assert info["audio_length"] == 512 and info["classes"] == CLASSES
    assert sorted(info["splits"]) == ["fold1", "fold2"]
    seen = {}
    for fold in ("fold1", "fold2"):
        for example in read_dataset(prepared, fold, jpeg_bytes=True):
            assert example["fbank"].shape == (512, 128)
            clip = example["id"].decode()
            seen[clip] = fold
            assert sorted(names)[int(example["label"][0])] == clip.split("/")[0]
    assert len(seen) == CLASSES * PER_CLASS + 2
    for name in names:  # each class dealt over both folds
        folds = [seen[f"{name}/{name}_{i:03d}"] for i in range(PER_CLASS)]
        assert folds.count("fold1") == folds.count("fold2") == PER_CLASS // 2


def test_clips_without_audio_or_video_are_reported_and_kept_per_the_policy(
    prepared, folders, tmp_path
):
    records = [json.loads(x) for x in (prepared / "failures.jsonl").read_text().splitlines()]
    mute = [r for r in records if r["path"].endswith("mute.mp4")]
    assert len(mute) == 1 and mute[0]["kept"] and "no audio track" in mute[0]["reason"]
    examples = [e for f in ("fold1", "fold2") for e in read_dataset(prepared, f, jpeg_bytes=True)]
    silent = next(e for e in examples if e["id"].decode().endswith("/mute"))
    assert silent["audio_frames"] == 0
    voice = next(r for r in records if r["path"].endswith("voice.mp4"))
    assert voice["kept"] and "no video track: given black frames" in voice["reason"]
    blank = next(e for e in examples if e["id"].decode().endswith("/voice"))
    assert blank["audio_frames"] > 0
    assert all(video.decode_jpeg(jpeg).max() < 8 for jpeg in blank["frames"])
    # the default policies skip both, with the reason
    out = tmp_path / "skip"
    cli.main(["prepare", "--input", str(folders), "--output", str(out), "--audio-length", "512"])
    records = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    mute = next(r for r in records if r["path"].endswith("mute.mp4"))
    assert not mute.get("kept") and mute["reason"].startswith("no audio stream")
    voice = next(r for r in records if r["path"].endswith("voice.mp4"))
    assert not voice.get("kept") and voice["reason"].startswith("no video stream")


def test_fbank_statistics_equal_numpy_over_the_real_frames(prepared):
    frames = []
    for fold in ("fold1", "fold2"):
        for example in read_dataset(prepared, fold, jpeg_bytes=True):
            frames.append(example["fbank"][: example["audio_frames"]].astype(np.float64))
    everything = np.concatenate(frames)
    mean, std = metadata.fbank_statistics(prepared, "fold1+fold2")
    np.testing.assert_allclose([mean, std], [everything.mean(), everything.std()], rtol=1e-10)
    one = np.concatenate(frames[: len(read_dataset(prepared, "fold1", jpeg_bytes=True))])
    np.testing.assert_allclose(
        metadata.fbank_statistics(prepared, "fold1"), [one.mean(), one.std()], rtol=1e-10
    )


def test_a_csv_with_label_and_fold_columns(folders, tmp_path):
    listing = tmp_path / "meta.csv"
    clips = sorted(folders.glob("*/*_00[01].mp4"))
    with listing.open("w") as f:  # ESC-50's layout: file names relative to the media folder
        writer = csv.writer(f)
        writer.writerow(["filename", "fold", "category"])
        rows = ((p.relative_to(folders), 1 + i % 2, p.parent.name) for i, p in enumerate(clips))
        writer.writerows(rows)
    out = tmp_path / "ds"
    cli.main(
        [
            "prepare",
            "--input",
            str(listing),
            "--media-dir",
            str(folders),
            "--output",
            str(out),
            "--label-column",
            "category",
            "--fold-column",
            "fold",
            "--audio-length",
            "256",
        ]
    )
    info = metadata.read(out)
    assert sorted(info["splits"]) == ["fold1", "fold2"]
    assert sum(s["clips"] for s in info["splits"].values()) == len(clips)
    assert info["classes"] == CLASSES and info["audio_length"] == 256


def test_trimming_an_audio_table_is_the_official_slicing_and_the_shorter_sin_cos_table():
    table = sincos_2d(64, 8, 64)[None]
    trimmed = np.asarray(fit_table(table, (8, 64), (8, 32), "trim"))
    sliced = table.reshape(1, 8, 64, 64)[:, :, :32].reshape(1, 256, 64)
    np.testing.assert_array_equal(trimmed, sliced)
    np.testing.assert_array_equal(trimmed[0], sincos_2d(64, 8, 32))


def test_interpolating_a_table_is_pytorch_bilinear_and_the_identity_at_the_same_size():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((1, 8 * 64, 32)).astype(np.float32)
    same = np.asarray(fit_table(jnp.asarray(table), (8, 64), (8, 64), "interpolate"))
    np.testing.assert_allclose(same, table, atol=1e-6)
    for new in ((8, 32), (8, 100), (12, 12)):
        ours = np.asarray(fit_table(jnp.asarray(table), (8, 64), new, "interpolate"))
        grid = torch.from_numpy(table.reshape(8, 64, 32)).permute(2, 0, 1)[None]
        theirs = torch.nn.functional.interpolate(
            grid, size=new, mode="bilinear", align_corners=False
        )
        theirs = theirs[0].permute(1, 2, 0).reshape(1, -1, 32).numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.fixture(scope="module")
def released_structure_pth(tmp_path_factory):
    """A pretrained CAV-MAE in the released file format with its 1024-frame audio table (narrow
    layers, so that it trains on this CPU)."""
    model = CAVMAE(ModelConfig(**{**TINY_MODEL, "num_heads": 1}), nnx.Rngs(3))
    path = tmp_path_factory.mktemp("released") / "audio_model.pth"
    convert.save_pth(model, path)
    return path


def test_a_1024_frame_checkpoint_loads_into_a_512_frame_classifier_trimmed(released_structure_pth):
    source = load_weights(str(released_structure_pth), "CAVMAEFT", strict=False, label_dim=3)
    cfg = ModelConfig(**{**TINY_MODEL, "num_heads": 1, "audio_length": 512, "label_dim": 3})
    target = CAVMAEFT(cfg, nnx.Rngs(0))
    notes = copy_weights(source, target, "released.pth")
    assert notes == ["pos_embed_a: trimmed from a 8x64 to a 8x32 grid"]
    table = np.asarray(source.pos_embed_a[...]).reshape(1, 8, 64, -1)[:, :, :32]
    np.testing.assert_array_equal(np.asarray(target.pos_embed_a[...]), table.reshape(1, 256, -1))
    loaded = nnx.to_flat_state(nnx.state(source))
    for path, variable in nnx.to_flat_state(nnx.state(target)):
        if path != ("pos_embed_a",) and path[0] != "mlp_head":
            np.testing.assert_array_equal(variable[...], dict(loaded)[path][...], str(path))
    longer = CAVMAEFT(cfg.replace(audio_length=2048), nnx.Rngs(0))
    with pytest.raises(UserError, match="init_positions=interpolate"):
        copy_weights(source, longer, "released.pth")
    notes = copy_weights(source, longer, "released.pth", fit="interpolate")
    assert notes == ["pos_embed_a: interpolated from a 8x64 to a 8x128 grid"]


def test_knn_scores_vote_like_scikit_learn_and_the_linear_probe_separates_separable_data():
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(1)
    centres = rng.standard_normal((4, 16)) * 3
    y_train, y_test = rng.integers(0, 4, 80), rng.integers(0, 4, 40)
    x_train = centres[y_train] + rng.standard_normal((80, 16))
    x_test = centres[y_test] + rng.standard_normal((40, 16))
    found = probe.scores(x_train, np.eye(4)[y_train], x_test, multi_label=False)
    knn = KNeighborsClassifier(probe.NEIGHBOURS, metric="cosine").fit(x_train, y_train)
    np.testing.assert_array_equal(found["knn"].argmax(axis=1), knn.predict(x_test))
    assert (found["linear"].argmax(axis=1) == y_test).mean() > 0.9


def test_probe_command_over_the_folds_of_a_512_frame_dataset(prepared, tmp_path, capsys):
    model_dir = tmp_path / "pretrained"
    convert.save_model(CAVMAE(ModelConfig(**TINY_MODEL), nnx.Rngs(0)), model_dir)
    cli.main(
        [
            "probe",
            str(model_dir),
            "--data",
            str(prepared),
            "--folds",
            str(FOLDS),
            "--output",
            str(tmp_path / "probe.json"),
        ]
    )
    out = capsys.readouterr().out
    assert re.search(r"joint\s+\d\.\d{4} ± \d\.\d{4}\s+\d\.\d{4} ± \d\.\d{4}", out)
    result = json.loads((tmp_path / "probe.json").read_text())
    assert result["metric"] == "acc" and result["folds"] == ["fold1", "fold2"]
    for name in ("audio", "visual", "joint"):
        for kind in ("linear", "knn"):
            assert len(result[name][kind]["folds"]) == FOLDS
            assert 0 <= result[name][kind]["mean"] <= 1


def test_audio_only_recipe_finetunes_on_audio_files_kept_with_black_frames(prepared, tmp_path):
    workdir = tmp_path / "audio"
    cli.main(
        [
            "finetune",
            "--config",
            "finetune:custom-audioonly,tiny",
            "--workdir",
            str(workdir),
            f"--config.data.dir={prepared}",
            "--config.data.train_split=fold1",
            "--config.data.eval_split=fold2",
            "--config.batch_size=2",
            "--config.epochs=1",
            "--config.wa=False",
        ]
    )
    result = json.loads((workdir / "evaluation.json").read_text())
    assert (
        result["loss"] == "ce"
        and result["clips"] == metadata.read(prepared)["splits"]["fold2"]["clips"]
    )
    assert [row["frame"] for row in result["per_frame"]] == [5]  # audio-only: one pass
    assert convert.model_info(workdir / "model")["finetuning"]["mode"] == "audioonly"


def test_visual_tables_of_another_image_size_are_interpolated():
    source = CAVMAE(ModelConfig(**TINY_MODEL), nnx.Rngs(0))
    target = CAVMAE(ModelConfig(**{**TINY_MODEL, "img_size": 160}), nnx.Rngs(1))
    notes = copy_weights(source, target, "pretrained")
    assert notes == [
        "decoder_pos_embed_v: interpolated from a 14x14 to a 10x10 grid",
        "pos_embed_v: interpolated from a 14x14 to a 10x10 grid",
    ]
    expected = fit_table(source.pos_embed_v[...], (14, 14), (10, 10), "interpolate")
    np.testing.assert_array_equal(np.asarray(target.pos_embed_v[...]), np.asarray(expected))


def test_a_model_records_its_fbank_statistics_and_embed_normalises_with_them(prepared, tmp_path):
    from cavmae_jax import pretrained
    from input_pipeline.dataset import Loader, LoaderConfig

    mean, std = metadata.fbank_statistics(prepared, "fold1")
    model = CAVMAE(ModelConfig(**{**TINY_MODEL, "audio_length": 512}), nnx.Rngs(2))
    convert.save_model(model, tmp_path / "model", fbank_norm=(mean, std))
    assert pretrained.load(str(tmp_path / "model")).fbank_norm == pytest.approx((mean, std))
    cli.main(
        [
            "embed",
            str(tmp_path / "model"),
            str(prepared),
            "--split",
            "fold1",
            "--output",
            str(tmp_path / "emb"),
        ]
    )
    config = LoaderConfig(batch_size=64, num_classes=CLASSES, train=False, mean=mean, std=std)
    batch = next(iter(Loader(prepared, "fold1", config)))
    expected = model.features(jnp.asarray(batch["audio"]), jnp.asarray(batch["image"]))
    np.testing.assert_allclose(
        np.load(tmp_path / "emb" / "audio.npy"), expected["audio"].mean(axis=1), atol=2e-5
    )
