"""Training metrics on disk: the JSON-lines log, TensorBoard scalars and the loss-curve figure."""

from __future__ import annotations

import json
import shutil
import tempfile

from cavmae_jax import paths
from cavmae_jax.paths import Path


def _rows(path: Path) -> list[dict]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line]
        if path.exists()
        else []
    )


def plot_curves(workdir: paths.PathLike, png_path: paths.PathLike) -> None:
    """Training loss terms (left) and accuracies (right: contrastive ``c_acc``, prototype
    ``p_acc``, the ``validation`` evaluator's mAP and accuracy) against the step, from
    ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = paths.path(workdir)
    logged = _rows(workdir / "metrics.jsonl")
    rows = [r for r in logged if "loss" in r]  # update lines (an evaluator may log alone)
    valid = [r for r in logged if "validation/mAP" in r]
    steps = [r["step"] for r in rows]
    fig, (losses, accuracy) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name in ("loss", "loss_mae_a", "loss_mae_v", "loss_pje", "loss_pcpe"):
        if rows and name in rows[0]:
            losses.plot(steps, [r[name] for r in rows], label=name)
    if rows and "loss_c" in rows[0]:
        losses.plot(steps, [100 * r["loss_c"] for r in rows], label="100 x loss_c")
    for name in ("c_acc", "p_acc"):  # contrastive / prototype accuracy
        if rows and name in rows[0]:
            accuracy.plot(steps, [r[name] for r in rows], label=name)
    for name in ("mAP", "acc"):
        if valid:
            accuracy.plot(
                [r["step"] for r in valid],
                [r[f"validation/{name}"] for r in valid],
                "o-",
                label=f"validation {name}",
            )
    for axis in (losses, accuracy):
        axis.set_xlabel("step")
        if axis.lines:
            axis.legend()
    accuracy.set_ylim(0, 1)
    fig.tight_layout()
    paths.save_figure(fig, png_path)
    plt.close(fig)


class MetricsWriter:
    """Appends one JSON object per logged step to ``<stem>.jsonl`` and writes the same scalars
    as TensorBoard summaries under ``tensorboard/`` (``tensorboard/<stem>`` for other logs than
    the training metrics); process 0 only, others write nothing.

    TensorBoard's writer reaches buckets only through TensorFlow's own client: for a ``gs://``
    workdir both are written in a local folder, and after every write what each file gained
    since the last one is appended to its copy in the bucket (``paths.append``)."""

    def __init__(self, workdir: Path, active: bool, stem: str = "metrics"):
        self.active = active
        if not active:
            return
        import tensorflow as tf

        self._tf = tf
        self._workdir = workdir
        self._local = Path(tempfile.mkdtemp()) if paths.is_remote(workdir) else workdir
        self._names = [f"{stem}.jsonl", "tensorboard/" + ("" if stem == "metrics" else stem)]
        self._sent: dict[str, int] = {}  # bytes of each local file already in the bucket
        if self._local != workdir and (workdir / self._names[0]).exists():
            history = (workdir / self._names[0]).read_bytes()
            (self._local / self._names[0]).write_bytes(history)
            self._sent[self._names[0]] = len(history)
        self._log = (self._local / self._names[0]).open("a")
        self._summary = tf.summary.create_file_writer(str(self._local / self._names[1]))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        self._log.write(json.dumps(metrics) + "\n")
        self._log.flush()
        with self._summary.as_default(step=step):
            for name, value in metrics.items():
                if name != "step":
                    self._tf.summary.scalar(name, value)
        self._summary.flush()
        self._upload()

    def _upload(self) -> None:
        if self._local == self._workdir:
            return
        board = self._local / self._names[1]
        for local in [
            self._local / self._names[0],
            *(paths.files(board) if board.exists() else []),
        ]:
            name = str(local.relative_to(self._local))
            with local.open("rb") as f:
                f.seek(self._sent.get(name, 0))
                new = f.read()
            if new:
                paths.append(self._workdir / name, new)
                self._sent[name] = self._sent.get(name, 0) + len(new)

    def close(self) -> None:
        if self.active:
            self._log.close()
            self._summary.close()
            self._upload()
            if self._local != self._workdir:
                shutil.rmtree(self._local)
