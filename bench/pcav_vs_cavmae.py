"""PCAV-MAE against CAV-MAE on the generated hierarchy set: three seeds, equal steps and equal
CPU time, the ablations of the paper's equations.

The data (``input_pipeline/synthetic_hierarchy.py``): 4 super-classes x 6 classes, every clip
different, hue and pitch drawn together per clip, 10% of clips mismatched, a held-out ``eval``
split (109 of 480 clips); a ``labelled`` split of 4 training clips per class for finetuning.
Every model is the same narrow encoder (64 wide, 3 + 1 layers) pretrained at batch 16:

  * CAV-MAE (``configs/demo.py``, contrastive weight 0.1: the released CAV-MAE-Base-C0.1
    setting, the paper's choice for retrieval) and PCAV-MAE (``configs/pcav.py:demo``, density
    prototypes at neighbourhoods 8 and 48) for the same steps;
  * CAV-MAE again for the CPU seconds PCAV-MAE took (the first seed's pair sets the ratio for
    all seeds), its learning-rate schedule stretched by the same factor;
  * PCAV-MAE without L_PJE (eq. 1), without L_PCPE (eq. 3), and with k-means prototypes
    (k = 24 and 4) instead of density peaks.

Every model is measured the same way, on the unmasked clip embeddings (modality streams,
mean-pooled, unit norm; joint = unit(audio + visual)):

  * linear probe (standardised features, logistic regression, fitted on the training split's
    joint embeddings) and 5-nearest-neighbour accuracy, scored on the held-out split, for the
    24 classes and the 4 super-classes;
  * prototype purity on the training split: density peaks at neighbourhood 8 and k-means with
    k = 24 (the fine granularity, scored against classes), density peaks at 48 and k-means
    k = 4 (the coarse one, against super-classes); the mean share of a prototype's clips that
    carry its majority label;
  * retrieval recall@1/5/10 both ways on the held-out split (chance 1/109 at recall@1);
  * accuracy on the held-out split after finetuning on the ``labelled`` split (``cavmae
    finetune``, cross-entropy, multimodal head; the paper's protocol in miniature).

Results go to ``WORKDIR/runs-STEPS/results.jsonl``; a finished run is not run again and an
interrupted pretraining resumes from its last checkpoint, so a bench cut short continues where
it stopped. Seeds may run as separate processes side by side (``--seeds 1`` and ``--seeds 2``:
each run's CPU seconds barely change, its wall seconds do, so the table leaves wall time out).
The table of means and spreads (sample standard deviation over seeds) is printed as Markdown.

    python bench/pcav_vs_cavmae.py                         # docs/pcavmae.md: about 7.5 h
    python bench/pcav_vs_cavmae.py --steps 100 --seeds 0   # a look in about 20 minutes
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
CAV, PCAV = "configs/demo.py", "configs/pcav.py:demo"
# the released CAV-MAE-Base-C0.1 weight, the paper's setting for retrieval: at the recipe's
# 0.01 the contrastive accuracy of this short run stays at chance
CAV_SETTINGS = ("--config.model.contrast_loss_weight=0.1",)
PCAV_SETTINGS = ("--config.pcav.granularities=(8, 48)",)
VARIANTS = {
    "CAV-MAE": (CAV, CAV_SETTINGS),
    "PCAV-MAE": (PCAV, PCAV_SETTINGS),
    "PCAV-MAE w/o L_PJE": (PCAV, (*PCAV_SETTINGS, "--config.pcav.pje_weight=0")),
    "PCAV-MAE w/o L_PCPE": (PCAV, (*PCAV_SETTINGS, "--config.pcav.pcpe_weight=0")),
    "PCAV-MAE k-means": (
        PCAV,
        ("--config.pcav.method=kmeans", "--config.pcav.granularities=(24, 4)"),
    ),
}
# The settings that are ours, not the paper's, one question each (docs/pcavmae.md), run with
# ``--variants`` beside "PCAV-MAE" and "CAV-MAE": a 23-update epoch here, 800 updates = 35 epochs
EXPERIMENTS = {
    "E1 half-life 1 epoch": (PCAV, (*PCAV_SETTINGS, "--config.pcav.ema_half_life_epochs=1")),
    "E1 half-life 5 epochs": (PCAV, (*PCAV_SETTINGS, "--config.pcav.ema_half_life_epochs=5")),
    "E2 L_r only": (
        PCAV,
        (*PCAV_SETTINGS, "--config.pcav.pje_weight=0", "--config.pcav.pcpe_weight=0"),
    ),
    "E2 PCL scale": (PCAV, (*PCAV_SETTINGS, "--config.pcav.scale=pcl")),
    "E3 warm-up 5 epochs": (PCAV, (*PCAV_SETTINGS, "--config.pcav.warmup_epochs=5")),
    "E4 symmetric eq. (1)": (PCAV, (*PCAV_SETTINGS, "--config.pcav.symmetric_pje=True")),
    "E4 + InfoNCE": (PCAV, (*PCAV_SETTINGS, "--config.pcav.infonce=always")),
    # E5: density neighbourhoods that find about the true counts (24 classes, 4 super-classes;
    # (8, 48) finds 6-15 and 2-4), and k-means at half and twice the true counts
    "E5 density (5, 32)": (PCAV, ("--config.pcav.granularities=(5, 32)",)),
    "E5 k-means (12, 2)": (
        PCAV,
        ("--config.pcav.method=kmeans", "--config.pcav.granularities=(12, 2)"),
    ),
    "E5 k-means (48, 8)": (
        PCAV,
        ("--config.pcav.method=kmeans", "--config.pcav.granularities=(48, 8)"),
    ),
    # the prototype terms at a tenth of their weight (L_r-only is weight 0)
    "E6 prototype weights 0.1": (
        PCAV,
        (*PCAV_SETTINGS, "--config.pcav.pje_weight=0.1", "--config.pcav.pcpe_weight=0.1"),
    ),
    # the two settings that moved the class probe most on seed 0 (E5's counts, E3's warm-up)
    "E7 density (5, 32) + warm-up": (
        PCAV,
        ("--config.pcav.granularities=(5, 32)", "--config.pcav.warmup_epochs=5"),
    ),
}
EQUAL_TIME = "CAV-MAE, PCAV-MAE's time"
CHECKPOINT_EVERY = 100  # pretraining updates between checkpoints: an interrupted run resumes
PURITY = (  # name, method, granularity, level scored against
    ("density8", "density", 8, "class"),
    ("kmeans24", "kmeans", 24, "class"),
    ("density48", "density", 48, "super"),
    ("kmeans4", "kmeans", 4, "super"),
)


def cli(*args: str, on_poll=None) -> dict[str, float]:
    """Run a ``cavmae`` command; returns its wall seconds and its CPU seconds (user + system,
    all threads: less sensitive than wall time to other load on the machine). While it runs,
    ``on_poll(cpu_s, wall_s)`` gets the seconds so far every 5 s (CPU from ``/proc``)."""
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    command = [sys.executable, "-m", "cavmae_jax.cli", *args]
    with tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        while child.poll() is None:
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                if on_poll:
                    on_poll(process_cpu_seconds(child.pid), time.perf_counter() - start)
        if child.returncode:
            stderr.seek(0)
            sys.exit(f"{' '.join(args[:3])} failed:\n{stderr.read()[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return {"wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(cpu, 1)}


def process_cpu_seconds(pid: int) -> float:
    """User + system seconds of a running process, all its threads (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_data(root: Path, clips: int, labelled_per_class: int) -> Path:
    """Generate and prepare the set once: ``train``, ``eval`` and ``labelled`` splits."""
    from input_pipeline import prepare, synthetic_hierarchy

    videos, dataset = root / "videos", root / "dataset"
    if (dataset / "prepare-labelled.json").exists():
        return dataset
    synthetic_hierarchy.generate(videos, clips=clips, seed=0)
    with open(videos / "train.csv") as f:
        train = list(csv.reader(f))
    taken: dict[str, int] = {}
    with open(videos / "labelled.csv", "w", newline="") as f:
        for row in train:
            taken[row[1]] = taken.get(row[1], 0) + 1
            if taken[row[1]] <= labelled_per_class:
                csv.writer(f).writerow(row)
    for split in ("train", "eval", "labelled"):
        prepare.prepare(
            videos / f"{split}.csv", dataset, videos / "labels.csv", 2, split, progress=False
        )
    return dataset


def pretrain(workdir: Path, dataset: Path, config: str, extra, steps: int, seed: int) -> dict:
    """``cavmae pretrain`` (skipped when it has run here); returns its seconds (``cli``).

    A run cut short resumes from its newest checkpoint (the trainer resumes exactly) and adds
    the seconds spent up to that checkpoint, noted in ``seconds-at-checkpoint.json`` while it
    ran (``latest``: the last note, for a checkpoint saved on SIGTERM); start-up then counts
    once per part (``parts``)."""
    if (workdir / "seconds.json").exists():
        return json.loads((workdir / "seconds.json").read_text())
    workdir.mkdir(parents=True, exist_ok=True)  # the notes may come before the run makes it
    notes_file = workdir / "seconds-at-checkpoint.json"
    notes = json.loads(notes_file.read_text()) if notes_file.exists() else {}
    resumed = max(checkpoint_steps(workdir), default=0)
    zero = {"cpu_s": 0.0, "wall_s": 0.0, "parts": 0}
    carried = notes.get(str(resumed), notes.get("latest", zero)) if resumed else zero

    def note(cpu_s: float, wall_s: float) -> None:
        now = {"cpu_s": carried["cpu_s"] + cpu_s, "wall_s": carried["wall_s"] + wall_s}
        now["parts"] = carried["parts"] + 1
        noted = {int(k) for k in notes if k.isdigit()}
        notes.update({str(step): now for step in checkpoint_steps(workdir) - noted})
        notes["latest"] = now
        notes_file.write_text(json.dumps(notes))

    seconds = cli(
        "pretrain",
        "--config",
        config,
        "--workdir",
        str(workdir),
        f"--config.data.dir={dataset}",
        f"--config.num_steps={steps}",
        f"--config.seed={seed}",
        f"--config.checkpoint_every={CHECKPOINT_EVERY}",
        *extra,
        on_poll=note,
    )
    seconds = {key: round(carried[key] + value, 1) for key, value in seconds.items()}
    seconds["parts"] = carried["parts"] + 1
    (workdir / "seconds.json").write_text(json.dumps(seconds))
    return seconds


def checkpoint_steps(workdir: Path) -> set[int]:
    """Steps of the run's finished checkpoints (Orbax names them by step once written)."""
    return {int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()}


def finetune(workdir: Path, dataset: Path, model: Path, epochs: int, seed: int) -> float:
    """Accuracy on ``eval`` (frame 5) after finetuning on ``labelled``: the official recipe's
    SpecAugment, noise, label smoothing and schedule shape (lr halved every epoch from the
    middle on, weights averaged over the second half); no mixup, which 96 clips cannot afford."""
    cli(
        "finetune",
        "--config",
        "configs/finetune.py:vgg,tiny",
        "--workdir",
        str(workdir),
        f"--config.init={model}",
        f"--config.data.dir={dataset}",
        "--config.data.train_split=labelled",
        "--config.data.eval_split=eval",
        "--config.data.classes=24",
        "--config.data.balanced=False",
        "--config.model.label_dim=24",
        "--config.batch_size=16",
        "--config.lr=1e-3",
        "--config.data.mixup=0",
        "--config.eval_frames=1",
        f"--config.epochs={epochs}",
        f"--config.lr_decay_start={epochs // 2}",
        f"--config.wa_start={epochs // 2 + 1}",
        f"--config.wa_end={epochs}",
        f"--config.seed={seed}",
        "--config.checkpoint_every=100000",
        "--config.evals.validation.every_epochs=0",
    )
    return json.loads((workdir / "evaluation.json").read_text())["acc"]


def embeddings(model_dir: Path, dataset: Path, split: str):
    """Unit audio, visual, their sum and the joint stream's embeddings of a split (``embed``'s
    path: mean-pooled, frame 5), and its class labels."""
    from cavmae_jax import convert, probe
    from cavmae_jax.losses import l2_normalize

    out = probe.split_embeddings(convert.load_model(model_dir), dataset, split, 32, 24, None)
    unit = lambda x: np.asarray(l2_normalize(x))  # noqa: E731
    audio, visual = unit(out["audio"]), unit(out["visual"])
    labels = out["label"].argmax(axis=1)
    return audio, visual, unit(audio + visual), unit(out["joint"]), labels


def run_curves(workdir: Path) -> dict:
    """E0's diagnostics from a run's log: the losses and the prototype accuracy at a quarter, a
    half and the end of the run, and the prototype counts found last."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss" in r]
    out = {}
    for name in ("loss_pje", "loss_pcpe", "loss_r", "loss_c", "p_acc"):
        if trained and name in trained[-1]:
            picks = [trained[max(0, round(len(trained) * f) - 1)] for f in (0.25, 0.5, 1.0)]
            out[f"curve_{name}"] = [round(float(r[name]), 4) for r in picks]
    banks = [r for r in rows if any(k.startswith("memory_bank/") for k in r)]
    if banks:
        counts = {k: v for k, v in banks[-1].items() if k.startswith("memory_bank/prototypes")}
        out.update({f"bank_{k.rsplit('_', 1)[-1]}": int(v) for k, v in counts.items()})
    return out


def momentum_cosine(workdir: Path, dataset: Path) -> float:
    """Mean cosine between the online and the momentum encoder's clip embeddings (audio and
    visual streams) on the held-out split: how far the momentum encoder lags."""
    online = embeddings(workdir / "model", dataset, "eval")
    momentum = embeddings(workdir / "momentum_model", dataset, "eval")
    cosines = [np.sum(online[i] * momentum[i], axis=1).mean() for i in (0, 1)]
    return float(np.mean(cosines))


def measure(model_dir: Path, dataset: Path) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from cavmae_jax import prototypes, retrieval
    from input_pipeline.synthetic_hierarchy import PER_SUPER

    a_train, v_train, train, joint_train, fine_train = embeddings(model_dir, dataset, "train")
    a_eval, v_eval, held, joint_eval, fine_eval = embeddings(model_dir, dataset, "eval")
    result = {}
    for level, divisor in (("class", 1), ("super", PER_SUPER)):
        y_train, y_eval = fine_train // divisor, fine_eval // divisor
        for prefix, x_train, x_eval in (("", train, held), ("joint_", joint_train, joint_eval)):
            probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
            probe.fit(x_train, y_train)
            result[f"{prefix}probe_{level}"] = float(probe.score(x_eval, y_eval))
            knn = KNeighborsClassifier(5, metric="cosine").fit(x_train, y_train)
            result[f"{prefix}knn_{level}"] = float(knn.score(x_eval, y_eval))
    for name, method, granularity, level in PURITY:
        y = fine_train // (PER_SUPER if level == "super" else 1)
        bank = prototypes.whole_bank(a_train, v_train)
        _, (found,) = prototypes.discover(bank, method, (granularity,), 512)
        majority = np.array(
            [np.bincount(y[found["labels"] == k]).max() for k in range(len(found["sizes"]))]
        )
        result[f"purity_{name}"] = float(np.mean(majority / found["sizes"]))
        result[f"wpurity_{name}"] = float(majority.sum() / found["sizes"].sum())  # by size
        result[f"prototypes_{name}"] = len(majority)
    recall = retrieval.recall(a_eval, v_eval)
    result.update({k: v for k, v in recall.items() if not k.endswith("_mr")})
    result["chance_r1"] = 1 / len(held)
    return result


def run_variant(runs, dataset, name, config, extra, steps, seed, finetune_epochs) -> dict:
    workdir = runs / f"{re.sub('[^a-z0-9]+', '-', name.lower())}-s{seed}"
    seconds = pretrain(workdir, dataset, config, extra, steps, seed)
    result = {"model": name, "seed": seed, "steps": steps, **seconds}
    result.update(measure(workdir / "model", dataset))
    result.update(run_curves(workdir))
    if (workdir / "momentum_model").exists():
        result["momentum_cosine"] = momentum_cosine(workdir, dataset)
    result["finetune_acc"] = finetune(
        workdir / "finetune", dataset, workdir / "model", finetune_epochs, seed
    )
    return result


def equal_time(steps: int, ratio: float) -> tuple[int, tuple[str, ...]]:
    """CAV-MAE's updates for ``ratio`` times the CPU seconds of ``steps`` (start-up included in
    both runs; the table shows what each used), and its learning-rate schedule stretched by the
    same factor (epochs rounded): unstretched, the recipe's per-epoch halvings leave the extra
    updates a learning rate near zero."""
    from cavmae_jax.config_loading import load_config

    recipe = load_config(CAV)
    return round(steps * ratio), (
        f"--config.lr_decay_start={round(recipe.lr_decay_start * ratio)}",
        f"--config.lr_decay_every={round(recipe.lr_decay_every * ratio)}",
    )


def cpu_ratio(results: list[dict]) -> float:
    """PCAV-MAE's CPU seconds over CAV-MAE's in the first seed that has both: one ratio for all
    seeds, so their equal-time runs have one length (heavy load from other programs inflates
    CPU seconds too, by 12% in one run here; it then shows in that run's row only)."""
    cpu = {(r["model"], r["seed"]): r["cpu_s"] for r in results}
    seed = min(s for model, s in cpu if model == "PCAV-MAE" and ("CAV-MAE", s) in cpu)
    return cpu["PCAV-MAE", seed] / cpu["CAV-MAE", seed]


COLUMNS = (  # heading, key, scale
    ("steps", "steps", 1),
    ("CPU s", "cpu_s", 1),
    ("probe class", "probe_class", 100),
    ("probe super", "probe_super", 100),
    ("5-NN class", "knn_class", 100),
    ("5-NN super", "knn_super", 100),
    ("joint probe class", "joint_probe_class", 100),
    ("joint 5-NN class", "joint_knn_class", 100),
    ("purity density 8", "purity_density8", 100),
    ("purity k-means 24", "purity_kmeans24", 100),
    ("purity density 48", "purity_density48", 100),
    ("purity k-means 4", "purity_kmeans4", 100),
    ("size-weighted purity density 8", "wpurity_density8", 100),
    ("size-weighted purity density 48", "wpurity_density48", 100),
    ("prototypes density 8", "prototypes_density8", 1),
    ("prototypes density 48", "prototypes_density48", 1),
    ("R@1 a->v", "a2v_r1", 100),
    ("R@5 a->v", "a2v_r5", 100),
    ("R@10 a->v", "a2v_r10", 100),
    ("R@1 v->a", "v2a_r1", 100),
    ("R@5 v->a", "v2a_r5", 100),
    ("R@10 v->a", "v2a_r10", 100),
    ("finetuned acc", "finetune_acc", 100),
    ("online-momentum cosine", "momentum_cosine", 1),
)


def table(results: list[dict]) -> str:
    """Markdown, one row per model, ``mean ± sd`` over its seeds (the mean alone for one seed;
    steps are a setting, the same in every seed); percentages except steps and seconds."""
    names = list(dict.fromkeys(r["model"] for r in results))
    lines = ["| model | seeds | " + " | ".join(c[0] for c in COLUMNS) + " |"]
    lines.append("|---" * (len(COLUMNS) + 2) + "|")
    for name in names:
        rows = [r for r in results if r["model"] == name]
        cells = []
        for _, key, scale in COLUMNS:
            values = np.array([r[key] for r in rows if key in r], float) * scale
            if not len(values):  # measured since, or not of this model
                cells.append("-")
                continue
            digits = 0 if key in ("steps", "cpu_s") or key.startswith("prototypes") else 1
            digits = 3 if key == "momentum_cosine" else digits
            cell = f"{values.mean():.{digits}f}"
            if len(values) > 1 and key != "steps":
                cell += f" ± {values.std(ddof=1):.{digits}f}"
            cells.append(cell)
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800, help="pretraining updates")
    parser.add_argument("--finetune-epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--clips", type=int, default=480, help="generated clips (20%% held out)")
    parser.add_argument("--labelled", type=int, default=4, help="finetuning clips per class")
    parser.add_argument("--workdir", default="workdir/pcav_vs_cavmae")
    parser.add_argument(
        "--variants",
        nargs="+",
        help="run only these (of the comparison and of the E-series) "
        f"{list({**VARIANTS, **EXPERIMENTS})}",
    )
    args = parser.parse_args()
    chosen = {**VARIANTS, **EXPERIMENTS}
    if args.variants:
        unknown = [name for name in args.variants if name not in chosen]
        if unknown:
            parser.error(f"unknown variants {unknown}")
        chosen = {name: chosen[name] for name in args.variants}
    else:
        chosen = VARIANTS
    root = Path(args.workdir)
    dataset = make_data(root / "data", args.clips, args.labelled)
    runs = root / f"runs-{args.steps}"  # one folder and one results file per pretraining length
    runs.mkdir(parents=True, exist_ok=True)
    results_file = runs / "results.jsonl"
    results = [json.loads(line) for line in results_file.open()] if results_file.exists() else []
    done = {(r["model"], r["seed"], r["steps"]) for r in results}

    def record(result: dict) -> None:
        results.append(result)
        with results_file.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps(result), flush=True)

    for seed in args.seeds:
        for name, (config, extra) in chosen.items():
            if (name, seed, args.steps) not in done:
                record(
                    run_variant(
                        runs, dataset, name, config, extra, args.steps, seed, args.finetune_epochs
                    )
                )
        if args.variants:
            continue
        if not any(r["model"] == EQUAL_TIME and r["seed"] == seed for r in results):
            steps, stretched = equal_time(args.steps, cpu_ratio(results))
            record(
                run_variant(
                    runs,
                    dataset,
                    EQUAL_TIME,
                    CAV,
                    (*CAV_SETTINGS, *stretched),
                    steps,
                    seed,
                    args.finetune_epochs,
                )
            )
    print(table([r for r in results if r["seed"] in args.seeds]))


if __name__ == "__main__":
    main()
