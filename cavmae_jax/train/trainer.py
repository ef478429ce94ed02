"""What a trainer is: the parts in which CAV-MAE pretraining, finetuning and PCAV-MAE differ.

A config names its trainer (``config.trainer``: ``pretrain``, ``finetune`` or ``pcav``); each
trainer's file holds the whole of it: its loss, its extra state, what it does after an update
and its periodic state refreshes. Setup, the step and the loop are shared (``train/setup.py``,
``train/steps.py``, ``train/loop.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import ml_collections
from flax import nnx

from cavmae_jax import convert
from cavmae_jax.evaluators import Period, fbank_norm
from cavmae_jax.models import ModelConfig
from cavmae_jax.paths import Path
from cavmae_jax.train.durations import Durations
from cavmae_jax.train.metrics import plot_curves
from cavmae_jax.train.steps import AfterUpdate, LossFn

# state -> (new state, scalars to log): a periodic change of the state outside the step
Refresh = Callable[[dict], tuple[dict, dict]]


class Trainer:
    """Defaults are those of self-supervised pretraining on unlabelled clips."""

    batch_keys: tuple[str, ...] = ("audio", "image")
    shown: tuple[str, ...] = ("loss",)  # metrics on the progress bar
    # layers that keep their initialisation where ``config.init`` lacks them (train/init_weights)
    own_layers: tuple[str, ...] = ()

    def model_config(self, config: ml_collections.ConfigDict) -> ModelConfig:
        return ModelConfig(**config.model.to_dict())

    def create(self, cfg: ModelConfig, seed: int) -> nnx.Module:
        raise NotImplementedError

    def load_init(self, source: str, cfg: ModelConfig, seed: int) -> nnx.Module:
        """The model whose weights start the run (``config.init``)."""
        return load_weights(source, "CAVMAE")

    def loader(self, config: ml_collections.ConfigDict, data_dir: Path, workdir: Path):
        """The training stream: random frame, noise + roll (the pretraining augmentation)."""
        import jax

        from input_pipeline.dataset import Loader, LoaderConfig

        loader_config = LoaderConfig(
            batch_size=config.batch_size // jax.process_count(),
            num_classes=config.data.classes,
            seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            noise=config.data.noise,
            mean=config.data.fbank_mean,
            std=config.data.fbank_std,
        )
        return Loader(data_dir, config.data.train_split, loader_config)

    def loss_phases(
        self, graphdef: nnx.GraphDef, config: ml_collections.ConfigDict, durations: Durations
    ) -> list[tuple[int, LossFn]]:
        """(last update, loss) of each phase of the run, in order."""
        raise NotImplementedError

    def extra_state(self, config: ml_collections.ConfigDict, cfg: ModelConfig, params) -> dict:
        """State kept beside params and optimizer state, a traceable function of the params."""
        return {}

    def after_update(
        self, config: ml_collections.ConfigDict, durations: Durations
    ) -> AfterUpdate | None:
        return None

    def refreshes(
        self,
        config: ml_collections.ConfigDict,
        graphdef: nnx.GraphDef,
        mesh,
        data_dir: Path,
        steps_per_epoch: int,
    ) -> list[tuple[str, Period, Refresh]]:
        """(name, period, refresh) of the state refreshes the loop runs, before the evaluators,
        when their period is due (their scalars are logged as ``name/scalar``)."""
        return []

    def final_evaluator(self, config: ml_collections.ConfigDict, graphdef, mesh, data_dir):
        """The evaluator ``finish`` runs after the last update (None: none)."""
        return None

    def refresh_programs(self, config: ml_collections.ConfigDict, setup, state: dict, clips: int):
        """{name: Lowered} of the device programs the refreshes run on ``clips`` training clips,
        lowered from the abstract ``state`` for ahead-of-time checks."""
        return {}

    def clip_flops(self, config: ml_collections.ConfigDict, cfg: ModelConfig) -> tuple:
        """Training FLOPs per clip of each phase (``loss_phases``), for TFLOP/s and MFU."""
        raise NotImplementedError

    def optimizer_options(self, config: ml_collections.ConfigDict) -> dict:
        return {}

    def finish(self, setup, state: dict, workdir: Path) -> dict:
        """After the last update, on every process: save the model (process 0)."""
        import jax

        model = setup.model(state["params"], state["rest"])
        convert.save_model(model, workdir / "model", fbank_norm=fbank_norm(setup.config))
        if jax.process_index() == 0:
            write_run_files(setup.config, workdir)
        return {}


def write_run_files(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """The run's settings (``config.json``) and loss curves (``loss.png``)."""
    (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    plot_curves(workdir, workdir / "loss.png")


def load_weights(source: str, kind: str, **overrides) -> nnx.Module:
    """An official ``.pth`` or released name (loaded non-strictly into ``kind``, as the
    official recipes) or a cavmae-jax model directory."""
    from cavmae_jax import pretrained

    if str(source) in pretrained.RELEASES:
        source = pretrained.download(pretrained.RELEASES[str(source)])
    if str(source).endswith(".pth"):
        return convert.model_from_pth(source, kind=kind, **overrides)
    return convert.load_model(source)
