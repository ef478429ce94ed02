"""The notebooks run from top to bottom (any cell that raises fails the test), on the CPU, with
small models and few steps chosen through their environment parameters, and are stored without
outputs."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pytest
from conftest import DATA, NARROW_FULL_INPUTS
from flax import nnx
from nbclient import NotebookClient

from cavmae_jax import cli, convert
from cavmae_jax.configs.common import TINY_MODEL
from cavmae_jax.models import CAVMAE, CAVMAEFT, ModelConfig
from cavmae_jax.models.pcav_mae import PCAVMAE
from input_pipeline import metadata

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NARROW = NARROW_FULL_INPUTS


def execute(name: str, monkeypatch, **env: str) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{name}: outputs stored"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    resources = {"metadata": {"path": str(NOTEBOOKS)}}
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources=resources).execute()
    return notebook


def text_outputs(notebook) -> str:
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def images(notebook) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def test_quickstart_classifies_embeds_retrieves_and_reconstructs(tmp_path, monkeypatch):
    """Offline: the official file names of a classifier and of the inpainting model, as a user
    passes downloaded files."""
    convert.save_pth(
        CAVMAEFT(NARROW.replace(tr_pos=True, label_dim=527), nnx.Rngs(0)),
        tmp_path / "as-full-51.2.pth",
    )
    convert.save_pth(CAVMAE(NARROW, nnx.Rngs(1)), tmp_path / "cav-mae-base-nonorm.pth")
    notebook = execute(
        "quickstart",
        monkeypatch,
        CAVMAE_CLASSIFIER=str(tmp_path / "as-full-51.2.pth"),
        CAVMAE_PRETRAINED=str(tmp_path / "cav-mae-base-nonorm.pth"),
        CAVMAE_NOTEBOOK_WORK=str(tmp_path / "work"),
    )
    out = text_outputs(notebook)
    assert all(name in out for name in (p.name for p in DATA.glob("*.mp4")))
    assert "(multimodal)" in out and "a2v_r1" in out
    assert images(notebook) == 2
    assert (tmp_path / "work" / "embeddings" / "audio.npy").exists()


def test_pretraining_notebook_trains_the_demo_model_and_logs_everything(tmp_path, monkeypatch):
    """The notebook's `cavmae pretrain --config demo` run: metrics.jsonl every update, TensorBoard
    tags, the saved model, live curves drawn, then retrieval on the run's dataset."""
    import tensorflow as tf

    work = tmp_path / "work"
    notebook = execute(
        "pretraining",
        monkeypatch,
        CAVMAE_NOTEBOOK_STEPS="4",
        CAVMAE_NOTEBOOK_CLIPS="32",
        CAVMAE_NOTEBOOK_WORK=str(work),
    )
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert all(np.isfinite(x["loss"]) and x["loss"] > 0 for x in lines)
    # the first update (compiling the step) is timed apart, off the throughput clock
    assert lines[0]["first_update_s"] > 0 and "clips_per_s" not in lines[0]
    assert all(x["clips_per_s"] > 0 and "first_update_s" not in x for x in lines[1:])
    assert convert.load_model(work / "model").cfg.embed_dim == 64
    (events,) = list((work / "tensorboard").glob("events.out.tfevents.*"))
    tags = {
        (value.tag, event.step)
        for event in tf.compat.v1.train.summary_iterator(str(events))
        for value in event.summary.value
    }
    assert {("loss", 1), ("loss", 4), ("c_acc", 2), ("mfu", 4)} <= tags
    assert images(notebook) >= 1
    assert "audio->visual R@1" in text_outputs(notebook)


def test_prototypes_notebook_trains_pcav_mae_and_explains_it(tmp_path, monkeypatch):
    """Two PCAV-MAE updates (prototypes found before the first and refreshed after step 1),
    then the explanations: report, t-SNE, one figure per explained clip; then the encoder is
    exported for finetuning like a CAV-MAE one."""
    work = tmp_path / "work"
    notebook = execute(
        "prototypes",
        monkeypatch,
        CAVMAE_NOTEBOOK_STEPS="2",
        CAVMAE_NOTEBOOK_CLIPS="32",
        CAVMAE_NOTEBOOK_WORK=str(work),
    )
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["memory_bank/prototypes_0"] > 0  # found before the first update
    assert {"loss_pje", "loss_pcpe", "loss_r", "p_acc", "memory_bank/prototypes_1"} <= set(rows[1])
    assert isinstance(convert.load_model(work / "momentum_model"), PCAVMAE)
    report = json.loads((work / "explain" / "prototypes.json").read_text())
    assert [level["granularity"] for level in report] == [5, 15]
    for level in report:
        assert sum(p["size"] for p in level["prototypes"]) == 32
        assert all(0 < p["purity"] <= 1 and p["gamma"] > 0 for p in level["prototypes"])
    assert (work / "explain" / "tsne.png").stat().st_size > 10_000
    assert len(list((work / "explain").glob("explain_*.png"))) == 2
    assert images(notebook) == 4  # loss curves, t-SNE, two explained clips
    assert "granularity 5:" in text_outputs(notebook)
    cli.main(["export", str(work / "model"), str(tmp_path / "ft"), "--label-dim", "8"])
    assert type(convert.load_model(tmp_path / "ft")).__name__ == "CAVMAEFT"


def test_own_data_notebook_prepares_probes_and_cross_validates_five_folds(tmp_path, monkeypatch):
    """The 5-fold example on generated 5-second clips from a pretrained model in the released
    file format (narrow layers): its 1024-frame audio table is trimmed to the clips' 512 frames
    for the probe and for every fold's finetuning; the custom recipe takes classes, loss and
    statistics from the dataset; the fold table, its JSON and a classified clip follow."""
    released = tmp_path / "audio_model.pth"
    convert.save_pth(CAVMAE(ModelConfig(**TINY_MODEL), nnx.Rngs(0)), released)
    work = tmp_path / "work"
    notebook = execute(
        "own_data",
        monkeypatch,
        CAVMAE_NOTEBOOK_WORK=str(work),
        CAVMAE_PRETRAINED=str(released),
        CAVMAE_NOTEBOOK_VARIANT="custom,tiny",
        CAVMAE_NOTEBOOK_CLASSES="4",
        CAVMAE_NOTEBOOK_PER_CLASS="5",
    )
    out = text_outputs(notebook)
    assert "model: pos_embed_a: trimmed from a 8x64 to a 8x32 grid" in out
    assert out.count("init: pos_embed_a: trimmed from a 8x64 to a 8x32 grid") == 5
    assert out.count("classes: 4 (the dataset's labels.csv)") == 5
    assert out.count("loss: ce (single-label: softmax and accuracy)") == 5
    data = work / "data"
    mean, std = metadata.fbank_statistics(data, "fold2+fold3+fold4+fold5")
    assert f"fbank normalisation: mean {mean:.4f}, std {std:.4f}" in out  # fold1's training folds
    report = json.loads((work / "runs" / "folds.json").read_text())
    assert report["metric"] == "acc"
    assert [row["fold"] for row in report["folds"]] == [f"fold{k}" for k in range(1, 6)]
    assert sum(row["clips"] for row in report["folds"]) == 20
    accs = [row["acc"] for row in report["folds"]]
    assert report["mean"] == pytest.approx(np.mean(accs))
    assert report["sd"] == pytest.approx(np.std(accs, ddof=1))
    assert f"acc {report['mean']:.4f} ± {report['sd']:.4f} over 5 folds" in out
    saved = convert.model_info(work / "runs" / "fold1" / "model")
    assert saved["fbank_norm"] == pytest.approx([mean, std])
    first_class = sorted(p.name for p in (work / "clips").iterdir())[0]
    assert f"{first_class}_000.mp4 (multimodal)" in out  # the classified clip and its top-3
