"""Load an ml_collections config and apply ``--config.a.b=value`` overrides.

A config is ``RECIPE[:variant]`` for a recipe shipped in the package (``pretrain:as-base``;
``configs/pretrain.py:as-base`` names the same one) or ``FILE.py[:variant]`` for one's own.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import ml_collections

from cavmae_jax.errors import UserError

RECIPES = ("demo", "pretrain", "finetune", "pcav")


def _module(name: str):
    """The module of a packaged recipe or of a config file."""
    path = Path(name)
    if path.is_file():
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    packaged = path.stem if path.suffix == ".py" and path.parent.name == "configs" else name
    if packaged in RECIPES:
        return importlib.import_module(f"cavmae_jax.configs.{packaged}")
    raise UserError(
        f"config {name}: no such file, and not a packaged recipe ({', '.join(RECIPES)})"
    )


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``pretrain:as-base``, ``configs/x.py`` or ``x.py:variant``: the ``get_config(variant)``."""
    name, _, arg = spec.partition(":")
    try:
        return _module(name).get_config(arg or None)
    except (KeyError, ValueError) as err:
        message = err.args[0] if err.args else err
        raise UserError(f"config {spec}: {message}") from err


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """Apply ``--config.a.b=value`` strings; the value is parsed as a Python literal when it is one
    and must keep the field's type (ints are accepted for float fields)."""
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise UserError(f"unrecognised argument {item!r}; overrides look like --config.x=1")
        dotted, raw = item[len("--config.") :].split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        *parents, leaf = dotted.split(".")
        node = config
        for depth, name in enumerate(parents):
            if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
                where = ".".join(parents[:depth]) or "the config"
                raise UserError(f"--config.{dotted}: {where} has no section {name!r}")
            node = node[name]
        if leaf not in node:
            known = ", ".join(sorted(node.keys()))
            raise UserError(f"--config.{dotted}: no field {leaf!r} (the fields there: {known})")
        old = node[leaf]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if old is not None and type(value) is not type(old):
            raise UserError(f"--config.{dotted}={raw}: expected {type(old).__name__}")
        node[leaf] = value
