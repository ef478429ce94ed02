"""Evaluators: what runs during and after training, and in ``cavmae evaluate / retrieval``.

Each is a small object with one ``run(state) -> {metric: value}`` over the train state (``params``
and ``rest``): it reads the state and never changes it, through the one batched, mesh-sharded
inference path (``cavmae_jax/inference.py``). ``config.evals`` names them with their periods:

    config.evals.validation = dict(kind="classification", every_epochs=1)
    config.evals.retrieval = dict(kind="retrieval", at_end=True, split="train")

Periods: ``every_epochs`` (or ``every_steps``, which wins when set), ``at_start`` (before the
first update of a fresh run), ``at_end`` (after the last update).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cavmae_jax import evaluation, retrieval
from cavmae_jax.errors import UserError
from cavmae_jax.inference import EVAL_FRAME, predict_split
from cavmae_jax.losses import CLASSIFICATION_LOSSES
from cavmae_jax.paths import Path
from cavmae_jax.sharding import BATCH_AXES


@dataclasses.dataclass
class Period:
    every_steps: int = 0  # 0: not periodic
    at_start: bool = False
    at_end: bool = False

    def due(self, step: int, last: int) -> bool:
        periodic = self.every_steps and step % self.every_steps == 0
        return bool(periodic or (self.at_end and step == last))


def frame_ensemble(logits_per_frame: jax.Array, loss: str) -> jax.Array:
    """The official multi-frame prediction: the mean over frames of the sigmoid (``bce``, mAP
    tasks) or softmax (``ce``, accuracy tasks) outputs. [F, B, K] -> [B, K]."""
    activation = jax.nn.sigmoid if loss == "bce" else jax.nn.softmax
    return activation(logits_per_frame.astype(jnp.float32)).mean(axis=0)


def make_logits_step(graphdef: nnx.GraphDef, mode: str, frames=None, loss: str = "bce"):
    """Jitted ``(params, rest, batch) -> {"logits": [B, K]}`` for evaluation on one frame; with
    ``frames`` (indices into a batch of all 10, ``image`` [B, 10, ...]) ``{"logits" [B, F, K],
    "scores" [B, K]}``: each frame's logits and their ensemble, in one pass over the batch."""

    def logits(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        if frames is None:
            return {"logits": model(batch["audio"], batch["image"], mode=mode)}
        images = jnp.moveaxis(batch["image"][:, jnp.asarray(frames)], 1, 0)
        per_frame = jax.lax.map(lambda image: model(batch["audio"], image, mode=mode), images)
        return {
            "logits": jnp.moveaxis(per_frame, 0, 1),
            "scores": frame_ensemble(per_frame, loss),
        }

    return jax.jit(logits)


class Classification:
    """Official statistics (mAP, mAUC, d-prime, accuracy; per-class AP / AUC) of a classifier on
    a split. One frame with ``drop_last`` is the official per-epoch validation (plus the
    loss); several frames average the sigmoid (mAP tasks) or softmax outputs, the official
    final evaluation, with each frame's own mAP and accuracy in ``per_frame``: the split is read
    once, with all its frames."""

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        mesh: Mesh,
        data_dir,
        split: str,
        batch_size: int,
        num_classes: int,
        mode: str,
        loss: str = "bce",
        frames=(EVAL_FRAME,),
        drop_last: bool = False,
        norm: tuple[float, float] | None = None,
    ):
        self.mesh, self.data_dir, self.split, self.norm = mesh, data_dir, split, norm
        self.batch_size, self.num_classes, self.loss = batch_size, num_classes, loss
        self.frames, self.drop_last = tuple(frames), drop_last
        several = self.frames if len(self.frames) > 1 else None
        self.logits = make_logits_step(graphdef, mode, several, loss)

    def outputs(self, state: dict) -> dict[str, np.ndarray]:
        """``logits`` [N, K] (one frame) or [N, F, K] and ``scores`` [N, K] (several), and
        ``label``, in the split's order."""
        return predict_split(
            lambda batch: self.logits(state["params"], state["rest"], batch),
            self.mesh,
            self.data_dir,
            self.split,
            self.batch_size,
            self.frames[0],
            self.drop_last,
            self.num_classes,
            all_frames=len(self.frames) > 1,
            norm=self.norm,
        )

    def program(self, state: dict, cfg):
        """The logits of one batch, lowered from the abstract ``state`` (ahead-of-time)."""
        frames = (len(self.frames),) if len(self.frames) > 1 else ()
        batch = abstract_inputs(cfg, self.mesh, self.batch_size, frames)
        return self.logits.lower(state["params"], state["rest"], batch)

    def run(self, state: dict) -> dict:
        out = self.outputs(state)
        labels, logits = out["label"], out["logits"]
        if not len(labels):
            raise UserError(
                f"{self.data_dir}: split {self.split} has no clip to evaluate in full batches "
                f"of {self.batch_size} (the official per-epoch validation drops the last, "
                "incomplete one): set the evaluator's drop_last=False or a smaller batch_size"
            )
        if len(self.frames) == 1:
            by_frame, scores = logits[:, None], logits
        else:
            by_frame, scores = logits, out["scores"]
        per_frame = []
        for i, frame in enumerate(self.frames):
            stats = evaluation.classification_stats(by_frame[:, i], labels)
            per_frame.append({"frame": frame, "mAP": stats["mAP"], "acc": stats["acc"]})
        stats = evaluation.classification_stats(scores, labels)
        stats.update(
            AP=stats["AP"].tolist(),
            AUC=stats["AUC"].tolist(),
            clips=int(len(labels)),
            per_frame=per_frame,
        )
        if len(self.frames) == 1:
            stats["valid_loss"] = float(CLASSIFICATION_LOSSES[self.loss](logits, labels))
        return stats


def pooled_features(graphdef: nnx.GraphDef) -> Callable:
    """Jitted ``(params, rest, batch) -> {"audio", "visual"}``: the official retrieval features,
    unmasked modality-specific streams mean-pooled over tokens."""

    @jax.jit
    def features(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        tokens = model.features(batch["audio"], batch["image"], joint=False)
        return {name: tokens[name].mean(axis=1) for name in ("audio", "visual")}

    return features


class Retrieval:
    """Audio <-> visual recall@1/5/10 and median rank on a split (the official protocol:
    frame 5, mean-pooled unmasked features, cosine), ranked in blocks on the mesh."""

    def __init__(
        self, graphdef: nnx.GraphDef, mesh: Mesh, data_dir, split: str, batch_size: int, norm=None
    ):
        self.mesh, self.data_dir, self.split, self.batch_size = mesh, data_dir, split, batch_size
        self.features, self.norm = pooled_features(graphdef), norm

    def embeddings(self, state: dict) -> dict[str, np.ndarray]:
        return predict_split(
            lambda batch: self.features(state["params"], state["rest"], batch),
            self.mesh,
            self.data_dir,
            self.split,
            self.batch_size,
            keys=("audio", "image"),
            norm=self.norm,
        )

    def program(self, state: dict, cfg):
        """The features of one batch, lowered from the abstract ``state`` (ahead-of-time)."""
        batch = abstract_inputs(cfg, self.mesh, self.batch_size)
        return self.features.lower(state["params"], state["rest"], batch)

    def run(self, state: dict) -> dict:
        emb = self.embeddings(state)
        result = retrieval.recall(emb["audio"], emb["visual"], self.mesh)
        clips = len(emb["audio"])
        return {**result, "clips": clips, "chance_r1": 1.0 / clips}


def abstract_inputs(cfg, mesh: Mesh, batch_size: int, frames: tuple = ()) -> dict:
    """A batch of ``audio`` and ``image`` (``frames`` per clip when given) as
    ``ShapeDtypeStruct``s split over the mesh's batch axes."""
    rows = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    shapes = {
        "audio": (batch_size, cfg.audio_length, cfg.num_mel_bins),
        "image": (batch_size, *frames, cfg.img_size, cfg.img_size, 3),
    }
    return {k: jax.ShapeDtypeStruct(v, jnp.float32, sharding=rows) for k, v in shapes.items()}


def fbank_norm(config: ml_collections.ConfigDict) -> tuple[float, float]:
    """The run's fbank (mean, std), as resolved at start-up (``train/data_settings.py``)."""
    return config.data.fbank_mean, config.data.fbank_std


def from_config(
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    mesh: Mesh,
    data_dir: Path,
    steps_per_epoch: int,
) -> list[tuple[str, Period, object]]:
    """(name, period, evaluator) of every entry of ``config.evals``."""
    evaluators = []
    for name, spec in config.get("evals", {}).items():
        evaluator = build(spec, config, graphdef, mesh, data_dir)
        evaluators.append((name, period_of(spec, steps_per_epoch), evaluator))
    return evaluators


def period_of(spec, steps_per_epoch: int) -> Period:
    """The period a config entry states (``every_epochs``/``every_steps``, ``at_start``,
    ``at_end``)."""
    return Period(
        every_steps=spec.get("every_steps", 0)
        or round(spec.get("every_epochs", 0) * steps_per_epoch),
        at_start=spec.get("at_start", False),
        at_end=spec.get("at_end", False),
    )


def build(spec, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, mesh: Mesh, data_dir):
    """One evaluator of kind ``spec.kind`` for a training run."""
    batch = spec.get("batch_size", config.batch_size)
    if spec.kind == "classification":
        eval_dir = config.data.get("eval_dir") or data_dir
        frames = tuple(spec.get("frames", (EVAL_FRAME,)))
        return Classification(
            graphdef,
            mesh,
            eval_dir,
            spec.get("split", config.data.eval_split),
            batch,
            config.model.label_dim,
            config.mode,
            config.loss,
            frames,
            drop_last=spec.get("drop_last", True),
            norm=fbank_norm(config),
        )
    if spec.kind == "retrieval":
        eval_dir = config.data.get("eval_dir") or data_dir
        split = spec.get("split", "train")
        return Retrieval(graphdef, mesh, eval_dir, split, batch, fbank_norm(config))
    raise UserError(f"unknown evaluator kind {spec.kind!r}")
