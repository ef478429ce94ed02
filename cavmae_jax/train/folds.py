"""k-fold cross-validation of a finetuning recipe on a dataset prepared with folds
(``cavmae prepare --folds K`` or ``--fold-column``: splits ``fold1``..``foldK``): fold k is
held out for evaluation while the others train, each fold in ``workdir/fold<k>`` (each resumes
like any run), and the folds' final figures with their mean and standard deviation go to
``workdir/folds.json``."""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np

from cavmae_jax import paths
from cavmae_jax.errors import UserError
from input_pipeline import metadata


def fold_splits(data_dir, folds: int) -> list[str]:
    """The dataset's ``fold<k>`` splits; there must be ``folds`` of them."""
    names = sorted(
        (s for s in metadata.read(data_dir).get("splits", {}) if s.startswith("fold")),
        key=lambda s: (len(s), s),
    )
    if len(names) != folds:
        raise UserError(
            f"{data_dir}: has {len(names)} fold splits ({', '.join(names) or 'none'}), not "
            f"{folds}: prepare it with --folds {folds} or --fold-column"
        )
    return names


def summary(rows: list[dict], metric: str) -> dict:
    """Mean and sample standard deviation (n - 1) of the folds' ``metric``."""
    values = np.array([row[metric] for row in rows], np.float64)
    sd = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {"metric": metric, "folds": rows, "mean": float(values.mean()), "sd": sd}


def cross_validate(config: ml_collections.ConfigDict, workdir, folds: int, run) -> dict:
    """``run(config, workdir)`` once per held-out fold; the summary, printed as a table."""
    workdir = paths.path(workdir)
    data_dir = config.data.dir
    if not data_dir:
        raise UserError("--folds needs the prepared dataset: set --config.data.dir")
    names = fold_splits(data_dir, folds)
    rows = []
    for held in names:
        fold = ml_collections.ConfigDict(config.to_dict())
        fold.data.train_split = "+".join(name for name in names if name != held)
        fold.data.eval_split, fold.data.eval_dir = held, ""
        result = run(fold, workdir / held)
        if "acc" not in result:
            raise UserError(f"fold {held} stopped before its end; run the same command again")
        rows.append(
            {
                "fold": held,
                "clips": result["clips"],
                "acc": result["acc"],
                "mAP": result["mAP"],
                "loss": result["loss"],
            }
        )
    metric = "mAP" if rows[0]["loss"] == "bce" else "acc"
    report = summary(rows, metric)
    if jax.process_index() == 0:
        (workdir / "folds.json").write_text(json.dumps(report, indent=1))
        print(f"{'fold':8s} {'clips':>6s} {metric:>8s}")
        for row in rows:
            print(f"{row['fold']:8s} {row['clips']:6d} {row[metric]:8.4f}")
        print(
            f"{metric} {report['mean']:.4f} ± {report['sd']:.4f} over {len(rows)} folds "
            f"(sd with n - 1; {workdir}/folds.json)"
        )
    return report
