"""``config.init`` into the configured model: loaded weights overwrite the fresh ones.

Position tables of another input size are fitted (``models/posemb.fit_table``): the audio table
of a longer clip is trimmed to the first time patches by default (the official maintainer's
advice for shorter clips) or interpolated along time; the visual table of another image size is
interpolated. A trainer may name layers of its own (``Trainer.own_layers``) that keep their
initialisation where the loaded model lacks them or holds them at other sizes. Everything else
must match; each adaptation is one line of the returned notes.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from cavmae_jax.errors import UserError
from cavmae_jax.models.posemb import fit_table

POSITION_FITS = ("trim", "interpolate")


def _grid_of(name: str, cfg) -> tuple[int, int] | None:
    """The patch grid of a position table (audio: frequency rows x time columns)."""
    if name.endswith("pos_embed_a"):
        return cfg.audio_grid
    if name.endswith("pos_embed_v"):
        return cfg.visual_grid
    return None


def _fit_position(name: str, value, source_cfg, target_cfg, fit: str, origin: str):
    """``value`` fitted to the target's grid, and the line that says so."""
    grid, new_grid = _grid_of(name, source_cfg), _grid_of(name, target_cfg)
    how = fit if name.endswith("_a") else "interpolate"
    if how == "trim" and (new_grid[0] > grid[0] or new_grid[1] > grid[1]):
        raise UserError(
            f"{origin}: {name} covers a {grid[0]}x{grid[1]} patch grid, the configured model "
            f"needs {new_grid[0]}x{new_grid[1]}: a longer input cannot be trimmed; set "
            "--config.init_positions=interpolate"
        )
    fitted = fit_table(value, grid, new_grid, how)
    verb = "trimmed" if how == "trim" else "interpolated"
    return (
        fitted,
        f"{name}: {verb} from a {grid[0]}x{grid[1]} to a {new_grid[0]}x{new_grid[1]} grid",
    )


def copy_weights(
    source: nnx.Module,
    target: nnx.Module,
    origin: str,
    fit: str = "trim",
    own_layers: tuple[str, ...] = (),
) -> list[str]:
    """Overwrite ``target``'s values with ``source``'s, keeping ``target``'s variable kinds
    (trainable or fixed) and sharded layout. Returns one line per adapted table and per own
    layer that kept its initialisation."""
    if fit not in POSITION_FITS:
        raise UserError(f"init_positions {fit!r}: expected one of {list(POSITION_FITS)}")
    loaded = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(source)))[0])
    state = nnx.state(target)
    expected = nnx.to_pure_dict(state)
    notes, kept = [], []

    def value_for(path, want):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        top = name.split(".")[0]
        value = loaded.pop(path, None)
        if (
            value is not None
            and value.shape != want.shape
            and value.shape[-1] == want.shape[-1]
            and _grid_of(top, target.cfg)
        ):
            value, note = _fit_position(top, value, source.cfg, target.cfg, fit, origin)
            notes.append(note)
        if value is not None and value.shape == want.shape:
            return np.asarray(value)
        if top in own_layers:
            kept.append(top)
            return want
        if value is None:
            raise UserError(
                f"{origin}: holds a {type(source).__name__} without {name}, which the "
                f"configured {type(target).__name__} has (other depths or parts)"
            )
        raise UserError(
            f"{origin}: {name} has shape {value.shape}, the configured model expects "
            f"{want.shape} (set --config.model.* to the checkpoint's sizes)"
        )

    values = jax.tree_util.tree_map_with_path(value_for, expected)
    if loaded:
        extra = sorted({jax.tree_util.keystr(p, simple=True, separator=".") for p in loaded})
        raise UserError(
            f"{origin}: holds a {type(source).__name__} with {extra[0]}"
            f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}, which the configured "
            f"{type(target).__name__} lacks (other depths or parts)"
        )
    shardings = jax.tree.map(lambda x: x.sharding, expected)
    nnx.replace_by_pure_dict(state, jax.device_put(values, shardings))
    nnx.update(target, state)
    for layer in dict.fromkeys(kept):
        notes.append(f"{layer}: not in {origin}, keeps its initialisation")
    return notes
