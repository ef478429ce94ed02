"""Load an ml_collections config (``path[:arg]``) and apply ``--config.a.b=value`` overrides."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import ml_collections


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``configs/x.py`` or ``configs/x.py:variant``: the file's ``get_config(variant)``."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """Apply ``--config.a.b=value`` strings; the value is parsed as a Python literal when it is one
    and must keep the field's type (ints are accepted for float fields)."""
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise ValueError(f"unrecognised argument {item!r}; overrides look like --config.x=1")
        dotted, raw = item[len("--config.") :].split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        *parents, leaf = dotted.split(".")
        node = config
        for name in parents:
            node = node[name]
        if leaf not in node:
            raise KeyError(f"--config.{dotted}: the config has no field {leaf!r}")
        old = node[leaf]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if old is not None and type(value) is not type(old):
            raise TypeError(f"--config.{dotted}={raw}: expected {type(old).__name__}")
        node[leaf] = value
