"""PCAV-MAE against CAV-MAE on the generated demo data, same steps and batch on this CPU.

Both models pretrain on the same prepared demo dataset (240 clips, 8 classes: each class pairs a
shape with a sound) for the same number of steps at batch 16 (``configs/demo.py`` and
``configs/pcav.py:demo``), and CAV-MAE once more for the CPU time PCAV-MAE took (its steps cost
more: momentum encoder, memory-bank refresh every epoch). Every model is measured the same way
on every clip's unmasked
embeddings (modality streams, mean-pooled, unit norm; joint = unit(audio + visual)):
  * prototype purity: density-peak prototypes at neighbourhoods 5 and 15 on the joint
    embeddings, and k-means with k = 8; the mean share of each prototype's clips carrying its
    majority label;
  * linear probe: logistic regression on the joint embedding, stratified 5-fold accuracy;
  * retrieval: audio->visual and visual->audio recall@1 (chance 1/240).

    python bench/pcav_vs_cavmae.py                 # about 20 minutes on 2 cores
    python bench/pcav_vs_cavmae.py --steps 100
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def pretrain(config: str, workdir: Path, data_dir: Path, steps: int) -> float:
    """Run ``cavmae pretrain`` (skipped when the model exists); returns wall seconds."""
    if (workdir / "model").exists():
        return float(json.loads((workdir / "wall.json").read_text())["seconds"])
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "cavmae_jax.cli",
            "pretrain",
            "--config",
            config,
            "--workdir",
            str(workdir),
            f"--config.data.dir={data_dir}",
            "--config.data.generate=False",
            f"--config.num_steps={steps}",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    seconds = time.perf_counter() - start
    (workdir / "wall.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def measure(model_dir: Path, data_dir: Path) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    from cavmae_jax import convert, prototypes, retrieval
    from cavmae_jax.explain import purity
    from cavmae_jax.losses import l2_normalize
    from cavmae_jax.train.evaluators import Retrieval
    from cavmae_jax.train.inference import replicated_state
    from cavmae_jax.train.sharding import make_mesh
    from input_pipeline.dataset import Loader, LoaderConfig

    mesh = make_mesh({"data": -1})
    graphdef, state = replicated_state(convert.load_checkpoint(model_dir), mesh)
    emb = Retrieval(graphdef, mesh, data_dir, "train", 32).embeddings(state)
    audio, visual = emb["audio"], emb["visual"]
    labels = Loader(data_dir, "train", LoaderConfig(32, num_classes=1, train=False)).labels()
    audio = audio / np.linalg.norm(audio, axis=1, keepdims=True)
    visual = visual / np.linalg.norm(visual, axis=1, keepdims=True)
    joint = np.asarray(l2_normalize(audio + visual))
    result = {}
    for name, method, granularity in (
        ("density5", "density", 5),
        ("density15", "density", 15),
        ("kmeans8", "kmeans", 8),
    ):
        _, (level,) = prototypes.discover(audio, visual, method, (granularity,), 256)
        purities = [
            purity(np.nonzero(level["labels"] == k)[0], labels) for k in range(len(level["sizes"]))
        ]
        result[f"purity_{name}"] = float(np.mean(purities))
        result[f"prototypes_{name}"] = len(purities)
    target = np.array([clip[0] for clip in labels])
    probe = LogisticRegression(max_iter=2000)
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    result["linear_probe_acc"] = float(cross_val_score(probe, joint, target, cv=folds).mean())
    recall = retrieval.recall(audio, visual, mesh)
    result.update(a2v_r1=recall["a2v_r1"], v2a_r1=recall["v2a_r1"], chance_r1=1 / len(joint))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workdir", default="workdir/compare")
    args = parser.parse_args()
    from input_pipeline import prepare, synthetic

    root = Path(args.workdir)
    data_dir = root / "data" / "dataset"
    if not (data_dir / "dataset_info.json").exists():
        videos = synthetic.generate(root / "data" / "videos", clips=240, classes=8, seed=0)
        prepare.prepare(videos, data_dir, labels=root / "data" / "videos" / "labels.csv", workers=2)
    runs = {"CAV-MAE": "configs/demo.py", "PCAV-MAE": "configs/pcav.py:demo"}
    walls = {}
    for name, config in runs.items():
        workdir = root / name.lower()
        walls[name] = pretrain(config, workdir, data_dir, args.steps)
        result = {"model": name, "steps": args.steps, "wall_s": round(walls[name], 1)}
        result.update(measure(workdir / "model", data_dir))
        print(json.dumps(result))
    # the same CPU time: CAV-MAE gets as many more steps as PCAV-MAE's steps cost more
    steps = round(args.steps * walls["PCAV-MAE"] / walls["CAV-MAE"])
    workdir = root / f"cav-mae-{steps}"
    seconds = pretrain(runs["CAV-MAE"], workdir, data_dir, steps)
    result = {"model": "CAV-MAE (PCAV-MAE's time)", "steps": steps, "wall_s": round(seconds, 1)}
    result.update(measure(workdir / "model", data_dir))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
