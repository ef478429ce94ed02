"""Explanations of a PCAV-MAE run through its prototypes (``cavmae explain``).

For a dataset: the prototypes of every granularity on the momentum encoder's embeddings, each
with its clip, size, gamma and (when the data has labels) purity (``prototypes.json``), and a
t-SNE map of the clip embeddings coloured by label with the prototypes marked (``tsne.png``, the
paper's figure 2). For a clip: its nearest prototypes at each granularity with their cosine
similarity, drawn as the prototype clips' frame and spectrogram (``explain_<id>.png``).
"""

from __future__ import annotations

import json

import ml_collections
import numpy as np

from cavmae_jax import convert, paths, prototypes
from cavmae_jax.errors import UserError
from cavmae_jax.inference import replicated_state, split_embeddings
from cavmae_jax.losses import l2_normalize
from cavmae_jax.paths import Path
from cavmae_jax.sharding import make_mesh

SHOWN_PER_LEVEL = 3


def dataset_embeddings(model, data_dir: Path, split: str, batch_size: int = 32) -> dict:
    """Unit audio and visual embeddings [N, D], ids and label indices of every clip, in order
    (one process: the ids and labels are read in the order one host evaluates)."""
    from input_pipeline.dataset import Loader, LoaderConfig

    mesh = make_mesh({"data": -1})
    graphdef, state = replicated_state(model, mesh)
    bank = split_embeddings(
        graphdef, mesh, data_dir, split, batch_size, state["params"], state["rest"]
    )
    loader = Loader(data_dir, split, LoaderConfig(batch_size, num_classes=1, train=False))
    return {**bank, "ids": loader.ids(), "labels": loader.labels()}


def purity(members: np.ndarray, labels: list[list[int]]) -> float | None:
    """Share of a prototype's clips that carry its most common label (None without labels)."""
    first = [labels[i][0] for i in members if labels[i]]
    if not first:
        return None
    return float(np.bincount(first).max() / len(members))


def prototype_report(levels, arrays, data: dict, granularities) -> list[dict]:
    report = []
    for g, (level, granularity) in enumerate(zip(levels, granularities, strict=True)):
        entries = []
        for k, size in enumerate(level["sizes"]):
            members = np.nonzero(level["labels"] == k)[0]
            entries.append(
                {
                    "prototype": k,
                    "clip": data["ids"][int(level["clips"][k])],
                    "size": int(size),
                    "gamma": float(arrays["gamma"][g, k]),
                    "purity": purity(members, data["labels"]),
                }
            )
        report.append({"granularity": granularity, "prototypes": entries})
    return report


def clip_media(data_dir: Path, split: str, ids: set[str]) -> dict[str, dict]:
    """Frame 5 (RGB uint8) and the fbank [1024, 128] of the clips ``ids``."""
    import tensorflow_datasets as tfds

    from input_pipeline.dataset import open_dataset
    from input_pipeline.video import decode_jpeg

    builder = open_dataset(data_dir)
    media = {}
    records = builder.as_dataset(split=split, decoders={"frames": tfds.decode.SkipDecoding()})
    for record in tfds.as_numpy(records):
        clip = record["id"].decode()
        if clip in ids:
            media[clip] = {"frame": decode_jpeg(record["frames"][5]), "fbank": record["fbank"]}
    return media


def draw_media(axes, media: dict, title: str) -> None:
    frame_axis, spec_axis = axes
    frame_axis.imshow(media["frame"])
    frame_axis.set_title(title, fontsize=8)
    spec_axis.imshow(np.asarray(media["fbank"], np.float32).T, origin="lower", aspect="auto")
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])


def explain_clip(index: int, data: dict, arrays: dict, levels, media: dict, path: Path) -> None:
    """The clip and its nearest prototypes per granularity (frame above spectrogram)."""
    import matplotlib.pyplot as plt

    joint = l2_normalize(data["audio"][index] + data["visual"][index])
    fig, axes = plt.subplots(
        2,
        1 + SHOWN_PER_LEVEL * len(levels),
        figsize=(2.2 * (1 + SHOWN_PER_LEVEL * len(levels)), 4.4),
        squeeze=False,
    )
    draw_media(axes[:, 0], media[data["ids"][index]], f"clip {data['ids'][index]}")
    column = 1
    for g, level in enumerate(levels):
        centres = l2_normalize(arrays["audio"][g] + arrays["visual"][g])
        sims = np.where(arrays["valid"][g], np.asarray(centres @ joint), -np.inf)
        for slot, k in enumerate(np.argsort(-sims)[:SHOWN_PER_LEVEL]):
            axes_pair = axes[:, column + slot]
            if k >= len(level["clips"]):  # fewer prototypes than columns
                for axis in axes_pair:
                    axis.axis("off")
                continue
            clip = data["ids"][int(level["clips"][k])]
            draw_media(axes_pair, media[clip], f"level {g} #{k}: {clip}\nsim {sims[k]:.3f}")
        column += SHOWN_PER_LEVEL
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=80)
    plt.close(fig)


def tsne_figure(data: dict, levels, path: Path, seed: int = 0) -> None:
    """t-SNE of the joint embeddings, coloured by first label; each granularity's prototype
    clips marked in black (level 0 filled stars)."""
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    joint = np.asarray(l2_normalize(data["audio"] + data["visual"]))
    perplexity = min(30.0, (len(joint) - 1) / 3)
    xy = TSNE(2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(joint)
    colour = [labels[0] if labels else -1 for labels in data["labels"]]
    fig, axis = plt.subplots(figsize=(6, 5))
    points = axis.scatter(xy[:, 0], xy[:, 1], c=colour, cmap="tab10", s=12)
    for g, (level, marker) in enumerate(zip(levels, "*PXD^v", strict=False)):
        clips = level["clips"]
        axis.scatter(
            xy[clips, 0],
            xy[clips, 1],
            marker=marker,
            s=180 - 40 * g,
            edgecolors="black",
            facecolors="none" if g else "black",
            label=f"prototypes, level {g}",
        )
    labels = axis.legend(*points.legend_elements(), title="label", fontsize=7, loc="upper right")
    axis.add_artist(labels)
    axis.legend(fontsize=7, loc="lower left")
    axis.set_title("clip embeddings (t-SNE) and prototypes")
    fig.tight_layout()
    paths.save_figure(fig, path)
    plt.close(fig)


def explain(
    workdir: paths.PathLike,
    output: paths.PathLike,
    data_dir: paths.PathLike | None = None,
    split: str = "train",
    clips: int = 4,
) -> dict:
    """Write ``prototypes.json``, ``tsne.png`` and ``explain_<id>.png`` for the first ``clips``
    clips of a finished PCAV-MAE run in ``workdir``; returns the prototype report."""
    workdir, output = paths.path(workdir), paths.path(output)
    output.mkdir(parents=True, exist_ok=True)
    config = json.loads((workdir / "config.json").read_text())
    pcav = config["pcav"]
    data_dir = data_dir or config["data"]["dir"]
    if not data_dir:
        raise UserError(f"{workdir}: the run names no dataset; give the one to explain")
    data_dir = paths.path(data_dir)
    model = convert.load_model(workdir / "momentum_model")
    data = dataset_embeddings(model, data_dir, split)
    granularities = tuple(pcav["granularities"])
    bank = prototypes.whole_bank(data["audio"], data["visual"])
    arrays, levels = prototypes.from_settings(bank, ml_collections.ConfigDict(pcav), config["seed"])
    report = prototype_report(levels, arrays, data, granularities)
    (output / "prototypes.json").write_text(json.dumps(report, indent=1))
    tsne_figure(data, levels, output / "tsne.png", config["seed"])
    shown = range(min(clips, len(data["ids"])))
    needed = {data["ids"][i] for i in shown}
    for level in levels:
        needed |= {data["ids"][int(c)] for c in level["clips"]}
    media = clip_media(data_dir, split, needed)
    for i in shown:
        explain_clip(i, data, arrays, levels, media, output / f"explain_{data['ids'][i]}.png")
    return {"levels": report, "clips": len(data["ids"])}
