"""The package's layout: imports (at any depth of a file) form no cycle and never run up a layer.

A module may import from its own layer and the layers below. Every module of ``cavmae_jax`` and
``input_pipeline`` must be placed in a layer, so that a new one is placed on purpose.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bottom to top: (layer, module prefixes)
LAYERS = [
    (
        "foundation",
        (
            "cavmae_jax.errors",
            "cavmae_jax.paths",
            "cavmae_jax.tpu",
            "cavmae_jax.peaks",
            "cavmae_jax.hlo_stats",
            "cavmae_jax.evaluation",
            "cavmae_jax.losses",
            "cavmae_jax.data",
        ),
    ),
    ("data", ("input_pipeline",)),
    (
        "model",
        (
            "cavmae_jax.models",
            "cavmae_jax.prototypes",
            "cavmae_jax.flops",
            "cavmae_jax.pth",
            "cavmae_jax.configs",
            "cavmae_jax.config_loading",
            "cavmae_jax.sharding",
        ),
    ),
    (
        "services",
        (
            "cavmae_jax.convert",
            "cavmae_jax.pretrained",
            "cavmae_jax.inference",
            "cavmae_jax.retrieval",
            "cavmae_jax.evaluators",
            "cavmae_jax.clip_inputs",
        ),
    ),
    ("training", ("cavmae_jax.train",)),
    (
        "applications",
        (
            "cavmae_jax.embed",
            "cavmae_jax.classify",
            "cavmae_jax.explain",
            "cavmae_jax.reconstruct",
            "cavmae_jax.probe",
        ),
    ),
    ("command", ("cavmae_jax.cli",)),
]
PACKAGES = ("cavmae_jax", "input_pipeline")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for file in (ROOT / package).rglob("*.py"):
            name = ".".join(file.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = file
    return found


def imported(name: str, file: Path, known: dict) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (``from a import b`` counts as
    ``a.b`` when that is a module, else as ``a``; a package's empty ``__init__`` is no edge)."""
    out = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            parts = name.split(".")
            if node.level:
                keep = len(parts) - node.level + (file.name == "__init__.py")
                base = ".".join(parts[:keep] + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in out if m in known and m != name and m not in PACKAGES}


def layer_of(name: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{name} is in no layer of tests/test_layout.py")


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, file, known) for name, file in known.items()}


def test_every_module_has_a_layer_and_imports_nothing_above_it():
    edges = graph()
    upward = [
        f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
        for a in sorted(edges)
        if a not in PACKAGES
        for b in sorted(edges[a])
        if layer_of(b) > layer_of(a)
    ]
    assert not upward, upward


def test_imports_form_no_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: a model module importing the trainer is seen as both."""
    package = tmp_path / "cavmae_jax"
    (package / "models").mkdir(parents=True)
    (package / "train").mkdir()
    (tmp_path / "input_pipeline").mkdir()
    (package / "models" / "m.py").write_text("from cavmae_jax.train import t\n")
    (package / "train" / "t.py").write_text("def f():\n    from cavmae_jax.models import m\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    edges = graph()
    assert edges["cavmae_jax.models.m"] == {"cavmae_jax.train.t"}
    assert edges["cavmae_jax.train.t"] == {"cavmae_jax.models.m"}
    assert layer_of("cavmae_jax.train.t") > layer_of("cavmae_jax.models.m")
