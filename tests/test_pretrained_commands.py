"""The released-model table, ``cavmae convert NAME``, and the commands for pretrained models
(embed, classify, reconstruct) on the two sample clips, from videos and from a prepared dataset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, NARROW_FULL_INPUTS
from flax import nnx

from cavmae_jax import classify, cli, clip_inputs, config_loading, convert, pretrained, reconstruct
from cavmae_jax.models import CAVMAE, CAVMAEFT
from cavmae_jax.models.cav_mae_ft import FT_MODES

ROOT = Path(__file__).resolve().parents[1]
CLIPS = sorted(str(p) for p in DATA.glob("*.mp4"))
NARROW = NARROW_FULL_INPUTS.replace(norm_pix_loss=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    pre = CAVMAE(NARROW, nnx.Rngs(0))
    ft = CAVMAEFT(NARROW.replace(tr_pos=True, label_dim=527), nnx.Rngs(1))
    convert.save_model(pre, root / "pre")
    convert.save_model(ft, root / "ft", {"mode": "multimodal", "loss": "bce"})
    return root, pre, ft


@pytest.fixture(scope="module")
def inputs():
    return [clip_inputs.read_video(c) for c in CLIPS]


def test_release_table_is_complete_and_consistent():
    releases = list(pretrained.RELEASES.values())
    assert len(releases) == 24
    assert len({r.file for r in releases}) == len(releases)
    finetuned = [r for r in releases if r.kind == "CAVMAEFT"]
    assert len(finetuned) == 8
    for r in releases:
        assert r.url == f"https://www.dropbox.com/s/{r.url.split('/')[-2]}/{r.file}?dl=1"
        recipe, *overrides = r.recipe.split()
        if recipe.startswith(("pretrain:", "finetune:")):
            config = config_loading.load_config(recipe)
            overrides = [o for o in overrides if o.startswith("--config.")]
            config_loading.apply_overrides(config, overrides)  # each names a real field
            expected = "finetune" if r.kind == "CAVMAEFT" else "pretrain"
            assert config.trainer == expected, r.name
        if r.kind == "CAVMAEFT":
            assert r.mode in FT_MODES and r.reported
            assert (r.label_dim, r.loss) == (
                (309, "ce") if "VGG" in r.finetune_data else (527, "bce")
            )
        else:
            assert r.mode is None and r.norm_pix_loss == (r.name != "cav-mae-base-nonorm")
    table = (ROOT / "docs" / "model_zoo.md").read_text()
    for r in releases:
        assert f"`{r.name}`" in table and r.url in table, r.name


def test_convert_name_uses_a_local_file_and_records_the_release(models, tmp_path, monkeypatch):
    _, _, ft = models
    monkeypatch.setenv("CAVMAE_WEIGHTS", str(tmp_path / "weights"))
    (tmp_path / "weights").mkdir()
    convert.save_pth(ft, tmp_path / "weights" / "as_46.6.pth")
    cli.main(["convert", "as2m-audio-46.6", str(tmp_path / "out")])
    info = convert.model_info(tmp_path / "out")
    assert info["finetuning"] == {"mode": "audioonly", "loss": "bce"}
    loaded = convert.load_model(tmp_path / "out")
    for name, value in convert.to_torch_state_dict(ft).items():
        np.testing.assert_array_equal(convert.to_torch_state_dict(loaded)[name], value)


def test_released_pretrained_file_gets_norm_pix_loss_from_the_table(models, tmp_path):
    _, pre, _ = models
    convert.save_pth(pre, tmp_path / "audio_model.21.pth")
    convert.save_pth(pre, tmp_path / "cav-mae-base-nonorm.pth")
    cli.main(["convert", str(tmp_path / "audio_model.21.pth"), str(tmp_path / "a")])
    cli.main(["convert", str(tmp_path / "cav-mae-base-nonorm.pth"), str(tmp_path / "b")])
    assert convert.model_info(tmp_path / "a")["config"]["norm_pix_loss"] is True
    assert convert.model_info(tmp_path / "b")["config"]["norm_pix_loss"] is False


def test_download_writes_the_file_whole_and_checks_its_size(models, tmp_path):
    _, _, ft = models
    convert.save_pth(ft, tmp_path / "served.pth")
    size = (tmp_path / "served.pth").stat().st_size
    release = pretrained.RELEASES["as2m-av-51.2"]
    local = release.__class__(**{**release.__dict__, "url": (tmp_path / "served.pth").as_uri()})
    got = pretrained.download(local, tmp_path / "cache")
    assert got.read_bytes() == (tmp_path / "served.pth").read_bytes()
    assert not list((tmp_path / "cache").glob("*.part"))
    wrong = local.__class__(**{**local.__dict__, "size": size + 1, "file": "x.pth"})
    with pytest.raises(pretrained.UserError, match=f"{size} bytes"):
        pretrained.download(wrong, tmp_path / "cache")
    gone = local.__class__(**{**local.__dict__, "url": (tmp_path / "no.pth").as_uri(), "file": "y"})
    with pytest.raises(pretrained.UserError, match="download it by hand"):
        pretrained.download(gone, tmp_path / "cache")


def test_classify_json_equals_the_mean_of_ten_frames_sigmoids(models, inputs, capsys):
    root, _, ft = models
    cli.main(["classify", str(root / "ft"), *CLIPS, "--json", "--top-k", "3"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [x["path"] for x in lines] == CLIPS
    names = classify.label_names()
    for result, example in zip(lines, inputs, strict=True):
        audio = np.repeat(example["audio"][None], 10, axis=0)
        logits = np.asarray(ft(audio, example["frames"], mode="multimodal"), np.float64)
        scores = np.mean(1 / (1 + np.exp(-logits)), axis=0)
        top = np.argsort(-scores)[:3]
        assert result["mode"] == "multimodal"
        assert [t["index"] for t in result["top"]] == top.tolist()
        assert [t["name"] for t in result["top"]] == [names[i] for i in top]
        np.testing.assert_allclose([t["score"] for t in result["top"]], scores[top], atol=1e-5)
        np.testing.assert_allclose(result["logits"], logits.mean(axis=0), atol=1e-4)
    assert names[0] == "Speech" and len(names) == 527


def test_a_classifier_that_does_not_record_its_loss_needs_the_scoring_flag(
    models, tmp_path, capsys
):
    """An official-layout .pth that is not a release: how its scores are formed is not
    guessed; one line asks for the flag, and with it the clip is classified."""
    _, _, ft = models
    convert.save_pth(ft, tmp_path / "mine.pth")
    for argv, flag in (
        (["classify", str(tmp_path / "mine.pth"), CLIPS[0]], "--activation sigmoid|softmax"),
        (["evaluate", "--model", str(tmp_path / "mine.pth"), "--data", "x"], "--metric mAP|acc"),
    ):
        with pytest.raises(SystemExit) as stopped:
            cli.main(argv)
        line = capsys.readouterr().err.strip()
        assert stopped.value.code == 2 and "\n" not in line
        assert (
            f"mine.pth: a classifier that does not record how it was trained; pass {flag}" in line
        )
    cli.main(["classify", str(tmp_path / "mine.pth"), CLIPS[0], "--activation", "sigmoid"])
    assert "multimodal" in capsys.readouterr().out


def test_classify_uses_the_recorded_mode_and_loss(models, inputs, tmp_path, capsys):
    _, _, ft = models
    convert.save_model(ft, tmp_path / "audio", {"mode": "audioonly", "loss": "ce"})
    cli.main(["classify", str(tmp_path / "audio"), CLIPS[0], "--json", "--top-k", "1"])
    result = json.loads(capsys.readouterr().out)
    logits = np.asarray(ft(inputs[0]["audio"][None], None, mode="audioonly"), np.float64)[0]
    softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert result["mode"] == "audioonly"
    assert result["top"][0]["index"] == int(softmax.argmax())
    assert result["top"][0]["score"] == pytest.approx(softmax.max(), abs=1e-5)


def test_embed_from_videos_and_from_a_prepared_dataset_agree(models, inputs, tmp_path, capsys):
    root, pre, _ = models
    cli.main(["embed", str(root / "pre"), str(DATA), "--output", str(tmp_path / "v"), "--tokens"])
    assert "2 clips" in capsys.readouterr().out
    ids = (tmp_path / "v" / "ids.txt").read_text().split()
    assert ids == CLIPS
    audio = np.load(tmp_path / "v" / "audio.npy")
    frames = np.stack([x["frames"][5] for x in inputs])
    feat_a, feat_v = pre.forward_feat(np.stack([x["audio"] for x in inputs]), frames)
    np.testing.assert_allclose(audio, np.asarray(feat_a).mean(axis=1), atol=1e-5)
    np.testing.assert_allclose(
        np.load(tmp_path / "v" / "visual.npy"), np.asarray(feat_v).mean(axis=1), atol=1e-5
    )
    assert np.load(tmp_path / "v" / "joint_tokens.npy").shape == (2, 708, 64)

    cli.main(["prepare", "--input", str(DATA), "--output", str(tmp_path / "ds")])
    cli.main(
        ["embed", str(root / "pre"), str(tmp_path / "ds"), "--split", "train"]
        + ["--output", str(tmp_path / "d")]
    )
    by_id = dict(
        zip(
            (tmp_path / "d" / "ids.txt").read_text().split(),
            np.load(tmp_path / "d" / "audio.npy"),
            strict=True,
        )
    )
    for clip, row in zip(CLIPS, audio, strict=True):
        np.testing.assert_allclose(by_id[Path(clip).stem], row, atol=1e-5)


def test_reconstruct_writes_the_three_views(models, inputs, tmp_path, capsys):
    root, pre, ft = models
    example = inputs[1]
    views = reconstruct.inpaint(pre, example["audio"], example["frames"][5], 0.75, 0.5)
    audio_mask = np.repeat(np.repeat(views["audio_mask"].reshape(8, 64), 16, 0), 16, 1)
    assert audio_mask.mean() == pytest.approx(1 - int(512 * 0.25) / 512)
    np.testing.assert_allclose(views["audio_original"], example["audio"].T, atol=1e-6)
    np.testing.assert_array_equal(views["audio_masked"][audio_mask == 1], 0)
    kept = audio_mask == 0
    np.testing.assert_allclose(
        views["audio_reconstructed"][kept], example["audio"].T[kept], atol=1e-6
    )
    image_mask = np.repeat(np.repeat(views["image_mask"].reshape(14, 14), 16, 0), 16, 1)
    assert image_mask.mean() == pytest.approx(98 / 196)
    assert not np.allclose(views["image_reconstructed"][image_mask == 1], 0)
    cli.main(["reconstruct", str(root / "pre"), CLIPS[1], "--output", str(tmp_path / "r.png")])
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "masked-patch MSE" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["reconstruct", str(root / "ft"), CLIPS[1], "--output", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    assert "needs a pretrained model with its decoder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, says",
    [
        (["evaluate", "--model", "{root}/ft", "--data", "{tmp}/none"], "not a prepared dataset"),
        (["classify", "{tmp}/none", "x.mp4"], "not a released model name"),
        (["embed", "{root}/pre", "{tmp}/none.mp4", "--output", "{tmp}/e"], "no such file"),
        (["train", "--config", "pretrain:nope", "--workdir", "{tmp}/w"], "unknown recipe"),
        (["convert", "{tmp}/not.pth", "{tmp}/o"], "no such directory or file"),
    ],
)
def test_mistakes_print_one_line_and_exit_2(models, tmp_path, capsys, argv, says):
    root, _, _ = models
    with pytest.raises(SystemExit) as exit_info:
        cli.main([a.format(root=root, tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and says in err and err.startswith(f"cavmae {argv[0]}: ")


def test_debug_shows_the_traceback(tmp_path):
    argv = ["classify", str(tmp_path / "none"), "x.mp4"]
    run = [sys.executable, "-m", "cavmae_jax.cli"]
    quiet = subprocess.run([*run, *argv], capture_output=True, text=True, cwd=ROOT)
    loud = subprocess.run([*run, "--debug", *argv], capture_output=True, text=True, cwd=ROOT)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "UserError" in loud.stderr


def test_every_command_documents_its_options():
    for name, sub in cli.parser()._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if action.dest not in ("help",):
                assert action.help, f"cavmae {name} {action.option_strings or action.dest}"


def test_command_synopsis_lists_every_option_of_every_command():
    synopsis = (ROOT / "docs" / "commands.md").read_text()
    block = synopsis.split("\n```\n", 1)[1].split("```", 1)[0]
    entries: dict[str, str] = {}
    for line in block.splitlines():
        if line.startswith("cavmae "):
            names = line.split()[1].split("|")
        for name in names:
            entries[name] = entries.get(name, "") + " " + line
    commands = cli.parser()._subparsers._group_actions[0].choices
    assert set(entries) == set(commands)
    for name, sub in commands.items():
        for action in sub._actions:
            for option in action.option_strings[-1:]:
                if option != "--help":
                    assert option in entries[name], f"docs/commands.md: cavmae {name} {option}"


def test_convert_needs_neither_the_data_extra_nor_torch(models, tmp_path):
    """The runtime alone converts a .pth: TensorFlow, TFDS, PyAV, Pillow and PyTorch are extras."""
    _, _, ft = models
    convert.save_pth(ft, tmp_path / "ft.pth")
    program = (
        "import sys\n"
        "from cavmae_jax import cli\n"
        f"cli.main(['convert', {str(tmp_path / 'ft.pth')!r}, {str(tmp_path / 'out')!r}])\n"
        "extras = ('tensorflow', 'tensorflow_datasets', 'av', 'PIL', 'torch')\n"
        "print(sorted(m for m in extras if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    assert done.stdout.splitlines()[-1] == "[]"
    assert convert.model_info(tmp_path / "out")["kind"] == "CAVMAEFT"
