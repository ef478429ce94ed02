"""Training metrics on disk: the JSON-lines log, TensorBoard scalars and the loss-curve figure."""

from __future__ import annotations

import json
from pathlib import Path


def plot_losses(metrics_path: str | Path, png_path: str | Path) -> None:
    """Loss terms and contrastive accuracy against the step, from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    steps = [r["step"] for r in rows]
    fig, (losses, accuracy) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name in ("loss", "loss_mae_a", "loss_mae_v"):
        losses.plot(steps, [r[name] for r in rows], label=name)
    losses.plot(steps, [100 * r["loss_c"] for r in rows], label="100 x loss_c")
    losses.set_xlabel("step")
    losses.legend()
    accuracy.plot(steps, [r["c_acc"] for r in rows], label="c_acc")
    accuracy.set_xlabel("step")
    accuracy.set_ylim(0, 1)
    accuracy.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and writes the same scalars
    as TensorBoard summaries under ``tensorboard/`` (process 0 only; others write nothing)."""

    def __init__(self, workdir: Path, active: bool):
        self.active = active
        if active:
            import tensorflow as tf

            self._tf = tf
            self._log = open(workdir / "metrics.jsonl", "a")
            self._summary = tf.summary.create_file_writer(str(workdir / "tensorboard"))

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

    def close(self) -> None:
        if self.active:
            self._log.close()
            self._summary.close()
