"""The notebooks run from top to bottom (any cell that raises fails the test), on the CPU, with
small models and few steps chosen through their environment parameters, and are stored without
outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from conftest import DATA, NARROW_FULL_INPUTS
from flax import nnx
from nbclient import NotebookClient

from cavmae_jax import convert
from cavmae_jax.models import CAVMAE, CAVMAEFT

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
    convert.save_torch_checkpoint(
        CAVMAEFT(NARROW.replace(tr_pos=True, label_dim=527), nnx.Rngs(0)),
        tmp_path / "as-full-51.2.pth",
    )
    convert.save_torch_checkpoint(CAVMAE(NARROW, nnx.Rngs(1)), tmp_path / "cav-mae-base-nonorm.pth")
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


@pytest.mark.parametrize("name", ["pretraining", "prototypes"])
def test_training_notebooks_train_and_draw(name, tmp_path, monkeypatch):
    notebook = execute(
        name,
        monkeypatch,
        CAVMAE_NOTEBOOK_STEPS="2",
        CAVMAE_NOTEBOOK_CLIPS="32",
        CAVMAE_NOTEBOOK_WORK=str(tmp_path / "work"),
    )
    assert (tmp_path / "work" / "model" / "model.json").exists()
    assert images(notebook) >= (1 if name == "pretraining" else 3)
    if name == "pretraining":
        assert "audio->visual R@1" in text_outputs(notebook)
    else:
        assert "granularity 5:" in text_outputs(notebook)
