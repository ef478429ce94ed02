"""Official ``.pth`` files <-> our models, and our model directories (Orbax parameters + config).

Our parameter paths are the official names with Flax leaf names (``kernel``, ``scale``), so a
name maps by ``kernel``/``scale`` -> ``weight``; values by transposing Linear weights and
reshaping the patch-embedding conv weight [D, C, p, p] <-> our [p*p*C, D] (official behaviour 6).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections import OrderedDict
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cavmae_jax import paths
from cavmae_jax.models import CAVMAE, CAVMAEFT, CAVMAEFTAudio, ModelConfig
from cavmae_jax.models.pcav_mae import PCAVMAE
from cavmae_jax.pth import CheckpointError, load_pth

Model = CAVMAE | CAVMAEFT | CAVMAEFTAudio
MODEL_KINDS = {"CAVMAE": CAVMAE, "CAVMAEFT": CAVMAEFT, "CAVMAEFTAudio": CAVMAEFTAudio}
SAVED_KINDS = {**MODEL_KINDS, "PCAVMAE": PCAVMAE}  # ours: Orbax only, no official counterpart
log = logging.getLogger(__name__)

# Official state-dict order: top-level tokens and tables, then modules in construction order.
_TOP_ORDER = [
    "modality_a",
    "modality_v",
    "pos_embed_a",
    "pos_embed_v",
    "mask_token",
    "decoder_modality_a",
    "decoder_modality_v",
    "decoder_pos_embed_a",
    "decoder_pos_embed_v",
    "patch_embed_a",
    "patch_embed_v",
    "blocks_a",
    "blocks_v",
    "blocks_u",
    "norm_a",
    "norm_v",
    "norm",
    "decoder_embed",
    "decoder_blocks",
    "decoder_norm",
    "decoder_pred_a",
    "decoder_pred_v",
    "mlp_head",
    "proto_proj_a",
    "proto_proj_v",  # PCAV-MAE's own, after the official names
]
_BLOCK_ORDER = ["norm1", "norm1_a", "norm1_v", "attn", "norm2", "norm2_a", "norm2_v", "mlp"]
_LEAF_ORDER = ["qkv", "proj", "fc1", "fc2", "weight", "bias"]


def torch_name(path: tuple) -> str:
    """Our state path -> official parameter name."""
    parts = [str(p) for p in path]
    if parts[-1] in ("kernel", "scale"):
        parts[-1] = "weight"
    return ".".join(parts)


def _order_key(name: str) -> tuple:
    parts = name.split(".")
    key = [_TOP_ORDER.index(parts[0])]
    for part in parts[1:]:
        if part.isdigit():
            key.append(int(part))
        elif part in _BLOCK_ORDER:
            key.append(_BLOCK_ORDER.index(part))
        else:
            key.append(_LEAF_ORDER.index(part))
    return tuple(key)


def _is_patch_kernel(path: tuple) -> bool:
    return path[0] in ("patch_embed_a", "patch_embed_v") and path[-1] == "kernel"


def _to_torch(path: tuple, value: np.ndarray, patch: int) -> np.ndarray:
    if _is_patch_kernel(path):
        chans = value.shape[0] // (patch * patch)
        return value.reshape(patch, patch, chans, -1).transpose(3, 2, 0, 1)
    if path[-1] == "kernel":
        return value.T
    return value


def _from_torch(path: tuple, value: np.ndarray) -> np.ndarray:
    if _is_patch_kernel(path):
        out_dim = value.shape[0]
        return value.transpose(2, 3, 1, 0).reshape(-1, out_dim)
    if path[-1] == "kernel":
        return value.T
    return value


def unstack_layers(path: tuple, value: np.ndarray):
    """Yield (per-layer path, value): a ``layers``-stacked parameter [L, ...] becomes L entries."""
    if "layers" not in path:
        yield path, value
        return
    k = path.index("layers")
    for i in range(value.shape[0]):
        yield path[:k] + (i,) + path[k + 1 :], value[i]


def _official_entries(model: Model, with_values: bool):
    """(official name, value in the official layout); zero-copy placeholders without values."""
    patch = model.cfg.patch_size
    for stacked_path, var in nnx.to_flat_state(nnx.state(model)):
        if with_values:
            value = np.asarray(var.get_value())
        else:
            value = np.broadcast_to(np.int8(0), var.shape)
        for path, layer_value in unstack_layers(stacked_path, value):
            yield torch_name(path), _to_torch(path, layer_value, patch)


def _official_order(items) -> OrderedDict:
    return OrderedDict(sorted(items, key=lambda item: _order_key(item[0])))


def to_torch_state_dict(model: Model) -> OrderedDict[str, np.ndarray]:
    """Official names -> float32 NumPy arrays, in the official state-dict order."""
    entries = _official_entries(model, with_values=True)
    return _official_order((name, np.ascontiguousarray(v)) for name, v in entries)


def official_shapes(model: Model) -> OrderedDict[str, tuple[int, ...]]:
    """Official names -> shapes, in order; works on abstract (``nnx.eval_shape``) models."""
    return _official_order((name, v.shape) for name, v in _official_entries(model, False))


def strip_module_prefix(state_dict: dict[str, Any]) -> dict[str, np.ndarray]:
    """Remove the ``module.`` prefix that DataParallel put on every released key."""
    return {k.removeprefix("module."): np.asarray(v) for k, v in state_dict.items()}


def _count(sd: dict, prefix: str) -> int:
    pattern = re.compile(rf"^{prefix}\.(\d+)\.")
    return len({m.group(1) for k in sd if (m := pattern.match(k))})


def infer_kind(sd: dict) -> str:
    """Which official class a state dict belongs to."""
    if "mlp_head.1.weight" in sd:
        return "CAVMAEFT" if "patch_embed_v.proj.weight" in sd else "CAVMAEFTAudio"
    if "patch_embed_a.proj.weight" in sd and "patch_embed_v.proj.weight" in sd:
        return "CAVMAE"
    raise CheckpointError("not a CAV-MAE state dict: no patch_embed_a/patch_embed_v/mlp_head keys")


def infer_config(sd: dict, kind: str, **overrides) -> ModelConfig:
    """Sizes from the tensor shapes. Head counts cannot be read from shapes: the official widths
    (64 per encoder head, 32 per decoder head) are assumed unless overridden; so are
    ``num_mel_bins=128`` and ``norm_pix_loss=False``. Finetuning models get ``tr_pos=True``."""
    embed_dim, in_a, patch, _ = sd["patch_embed_a.proj.weight"].shape
    fields: dict[str, Any] = dict(
        patch_size=patch,
        embed_dim=embed_dim,
        num_heads=max(1, embed_dim // 64),
        modality_specific_depth=_count(sd, "blocks_a"),
        depth=_count(sd, "blocks_a") + _count(sd, "blocks_u"),
        mlp_ratio=sd["blocks_u.0.mlp.fc1.weight"].shape[0] / embed_dim
        if "blocks_u.0.mlp.fc1.weight" in sd
        else sd["blocks_a.0.mlp.fc1.weight"].shape[0] / embed_dim,
        tr_pos=kind != "CAVMAE",
    )
    fields.update({k: v for k, v in overrides.items() if k in ("num_mel_bins",)})
    mel = fields.get("num_mel_bins", ModelConfig.num_mel_bins)
    fields["audio_length"] = sd["pos_embed_a"].shape[1] // (mel // patch) * patch
    if "pos_embed_v" in sd:
        fields["img_size"] = math.isqrt(sd["pos_embed_v"].shape[1]) * patch
        fields["in_chans"] = sd["patch_embed_v.proj.weight"].shape[1]
    if "mlp_head.1.weight" in sd:
        fields["label_dim"] = sd["mlp_head.1.weight"].shape[0]
    if kind == "CAVMAE":
        depth = _count(sd, "decoder_blocks")
        fields["decoder_depth"] = depth
        if depth:
            dd = sd["decoder_embed.weight"].shape[0]
            fields.update(decoder_embed_dim=dd, decoder_num_heads=max(1, dd // 32))
    fields.update(overrides)
    return ModelConfig(**fields)


def _brief(names: list[str]) -> str:
    return str(names[:8])[:-1] + (", ...]" if len(names) > 8 else "]")


def _abstract(kind: str, cfg: ModelConfig) -> Model:
    return nnx.eval_shape(lambda: SAVED_KINDS[kind](cfg, nnx.Rngs(0)))


def from_torch_state_dict(
    state_dict: dict[str, Any],
    kind: str | None = None,
    strict: bool = True,
    seed: int = 0,
    source: str = "state dict",
    **config_overrides,
) -> Model:
    """Build our model from an official state dict ({name: array}, with or without ``module.``).

    ``kind`` (CAVMAE, CAVMAEFT, CAVMAEFTAudio) and the sizes are inferred. With ``strict=False``
    missing parameters keep a fresh initialisation (seed ``seed``) and extra keys are ignored,
    both logged, as the official non-strict loads (e.g. a pretrained encoder into CAVMAEFT).
    """
    sd = strip_module_prefix(state_dict)
    kind = kind or infer_kind(sd)
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {list(MODEL_KINDS)}")
    cfg = infer_config(sd, kind, **config_overrides)
    if strict:
        graphdef, state = nnx.split(_abstract(kind, cfg))
    else:
        graphdef, state = nnx.split(MODEL_KINDS[kind](cfg, nnx.Rngs(seed)))
    flat, used, missing = [], set(), []
    for stacked_path, var in nnx.to_flat_state(state):
        layers = list(unstack_layers(stacked_path, np.zeros(var.shape, np.int8)))
        names = [torch_name(path) for path, _ in layers]
        absent = [name for name in names if name not in sd]
        if absent:
            missing.extend(absent)
            flat.append((stacked_path, var))
            continue
        values = []
        for (path, template), name in zip(layers, names, strict=True):
            value = _from_torch(path, sd[name])
            if value.shape != template.shape:
                expected = _to_torch(path, template, cfg.patch_size).shape
                raise CheckpointError(
                    f"{source}: {name} has shape {sd[name].shape}, the model expects {expected}"
                )
            values.append(value)
        value = np.stack(values) if "layers" in stacked_path else values[0]
        flat.append((stacked_path, var.replace(value=jnp.asarray(value, var.dtype))))
        used.update(names)
    unexpected = sorted(set(sd) - used)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{source} does not match {kind}: missing {_brief(missing)}, "
            f"unexpected {_brief(unexpected)} "
            "(pass strict=False to load what matches)"
        )
    if missing or unexpected:
        log.info("%s into %s: missing %s, unexpected %s", source, kind, missing, unexpected)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def model_from_pth(path: paths.PathLike, **kwargs) -> Model:
    """Load an official ``.pth`` (a state dict, or a dict holding one under ``model``)."""
    obj = load_pth(path)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return from_torch_state_dict(obj, source=str(path), **kwargs)


def save_pth(model: Model, path: paths.PathLike, module_prefix: bool = True) -> None:
    """Write an official-format ``.pth`` (needs PyTorch); keys get ``module.`` like the releases."""
    import torch

    prefix = "module." if module_prefix else ""
    sd = OrderedDict(
        (prefix + k, torch.from_numpy(np.array(v))) for k, v in to_torch_state_dict(model).items()
    )
    with paths.path(path).open("wb") as f:
        torch.save(sd, f)


def export_encoder(model: CAVMAE, label_dim: int, seed: int = 0) -> CAVMAEFT:
    """A finetuning model from a pretrained one, as the official finetuning init: the encoder
    (positions included, now trainable) is copied, the decoder dropped, the head fresh."""
    return from_torch_state_dict(
        to_torch_state_dict(model),
        kind="CAVMAEFT",
        strict=False,
        seed=seed,
        label_dim=label_dim,
        num_mel_bins=model.cfg.num_mel_bins,
        num_heads=model.cfg.num_heads,
    )


def mae_imagenet_init(mae_state_dict: dict[str, Any], seed: int = 0, **config_overrides) -> CAVMAE:
    """CAV-MAE initialisation from the ImageNet MAE ViT-B checkpoint, as ``adapt_vmae_weights``.

    Encoder block i < modality_specific_depth -> ``blocks_a.i`` and ``blocks_v.i``; the rest ->
    ``blocks_u`` (their norms also into the ``_a``/``_v`` pairs); MAE ``norm`` -> ``norm``,
    ``norm_a``, ``norm_v``; patch weight summed over RGB for audio; visual tables without the class
    row; ``decoder_pred_a`` = first 256 rows of ``decoder_pred``. Modality tokens stay random.
    """
    mae = strip_module_prefix(mae_state_dict.get("model", mae_state_dict))
    cfg = ModelConfig(**config_overrides)
    sd = dict(to_torch_state_dict(CAVMAE(cfg, nnx.Rngs(seed))))
    sd.update({k: v for k, v in mae.items() if k in sd})  # the non-strict load under equal names
    block_parts = ("norm1", "attn", "norm2", "mlp")
    for name, value in mae.items():
        if not name.startswith("blocks."):
            continue
        _, index, part, rest = name.split(".", 3)
        if part not in block_parts:
            continue
        i = int(index)
        if i < cfg.modality_specific_depth:
            targets = [f"blocks_a.{i}.{part}", f"blocks_v.{i}.{part}"]
        else:
            shared = f"blocks_u.{i - cfg.modality_specific_depth}"
            targets = [f"{shared}.{part}"]
            if part.startswith("norm"):
                targets += [f"{shared}.{part}_a", f"{shared}.{part}_v"]
        for target in targets:
            sd[f"{target}.{rest}"] = value
    for suffix in ("weight", "bias"):
        sd[f"norm_a.{suffix}"] = sd[f"norm_v.{suffix}"] = mae[f"norm.{suffix}"]
    sd["pos_embed_v"] = mae["pos_embed"][:, 1:]
    sd["decoder_pos_embed_v"] = mae["decoder_pos_embed"][:, 1:]
    sd["patch_embed_a.proj.weight"] = mae["patch_embed.proj.weight"].sum(axis=1, keepdims=True)
    sd["patch_embed_a.proj.bias"] = mae["patch_embed.proj.bias"]
    sd["patch_embed_v.proj.weight"] = mae["patch_embed.proj.weight"]
    sd["patch_embed_v.proj.bias"] = mae["patch_embed.proj.bias"]
    audio_out = sd["decoder_pred_a.weight"].shape[0]
    sd["decoder_pred_a.weight"] = mae["decoder_pred.weight"][:audio_out]
    sd["decoder_pred_a.bias"] = mae["decoder_pred.bias"][:audio_out]
    sd["decoder_pred_v.weight"] = mae["decoder_pred.weight"]
    sd["decoder_pred_v.bias"] = mae["decoder_pred.bias"]
    fields = {f: getattr(cfg, f) for f in ("num_mel_bins", "num_heads", "decoder_num_heads")}
    return from_torch_state_dict(sd, kind="CAVMAE", source="MAE init", **fields)


# Our model directories -------------------------------------------------------------------------


def save_model(
    model: Model,
    directory: paths.PathLike,
    finetuning: dict | None = None,
    fbank_norm: tuple[float, float] | None = None,
) -> None:
    """A model directory: the parameters saved by Orbax (``state``) and ``model.json``;
    ``finetuning`` (``{"mode", "loss"}``) records how a classifier was trained, so that
    evaluation and classification use that mode and that output function by default, and
    ``fbank_norm`` the fbank (mean, std) it was trained with, so that every command normalises
    its inputs the same way.
    In a multi-process run every process calls it (Orbax writes the arrays together)."""
    import orbax.checkpoint as ocp

    directory = paths.path(directory)
    first = jax.process_index() == 0
    if first:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "model.json").unlink(missing_ok=True)  # until the new state is whole
    state = nnx.to_pure_dict(nnx.state(model))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "state", state, force=True)
    # the attention implementation is chosen where the model runs, not stored with it
    config = dataclasses.asdict(model.cfg.replace(attention="auto"))
    meta = {"kind": type(model).__name__, "config": config}
    if finetuning:
        meta["finetuning"] = dict(finetuning)
    if fbank_norm:
        meta["fbank_norm"] = [float(x) for x in fbank_norm]
    if first:  # written last and whole: a directory without it is not a model
        paths.publish(directory / "model.json", lambda name: _write_json(name, meta))


def _write_json(name: str, value: dict) -> None:
    with open(name, "w") as f:
        json.dump(value, f, indent=1)


def model_info(directory: paths.PathLike) -> dict:
    """``model.json`` of a saved model: ``kind``, ``config``, for models trained here
    ``fbank_norm`` and for classifiers trained here ``finetuning``."""
    directory = paths.path(directory)
    meta_file = directory / "model.json"
    if not meta_file.exists():
        raise CheckpointError(f"{directory}: no model.json, not a cavmae-jax model directory")
    return json.loads(meta_file.read_text())


def load_model(directory: paths.PathLike) -> Model:
    """Restore a model written by ``save_model``."""
    import orbax.checkpoint as ocp

    directory = paths.path(directory)
    meta = model_info(directory)
    graphdef, abstract_state = nnx.split(_abstract(meta["kind"], ModelConfig(**meta["config"])))
    # on this process's first device, whatever mesh the model was saved from (a pod's)
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here),
        nnx.to_pure_dict(abstract_state),
    )
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(directory / "state", target)
    nnx.replace_by_pure_dict(abstract_state, restored)
    return nnx.merge(graphdef, abstract_state)
