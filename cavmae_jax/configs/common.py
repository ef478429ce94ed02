"""What every recipe shares: the fields of a run that do not depend on its trainer, with their
defaults, and the one CPU-sized model of the demo and the ``,tiny`` variants.

A recipe starts from ``run_config(trainer)`` and changes values or adds its trainer's own
fields, so that an override of a shared field (any model field among them) is valid for every
recipe.
"""

import dataclasses

import ml_collections

from cavmae_jax.models.config import ModelConfig
from input_pipeline.audio import DATASET_MEAN, DATASET_STD

# A narrow 4-layer CAV-MAE on full-size inputs: trains in seconds per hundred steps on a 2-core CPU
TINY_MODEL = dict(
    embed_dim=64,
    depth=4,
    modality_specific_depth=3,
    num_heads=4,
    decoder_embed_dim=32,
    decoder_depth=2,
    decoder_num_heads=4,
    dtype="float32",
)
CPU_PEAK_TFLOPS = 0.48  # this 2-core CPU's float32 matmul peak, for MFU on the tiny runs


def run_config(trainer: str) -> ml_collections.ConfigDict:
    """The shared fields of a ``trainer`` run (``pretrain``, ``finetune`` or ``pcav``)."""
    config = ml_collections.ConfigDict()
    config.trainer = trainer
    # every field of the model (cavmae_jax/models/config.py), so that any can be overridden
    config.model = ml_collections.ConfigDict(dataclasses.asdict(ModelConfig(dtype="bfloat16")))
    config.data = ml_collections.ConfigDict(
        dict(
            dir="",  # the training dataset (a `cavmae prepare` output)
            train_split="train",
            classes=527,
            noise=True,  # the official noise + time roll augmentation
            # fbank normalisation: audioset (the official constants) | dataset (its statistics)
            norm="audioset",
            fbank_mean=DATASET_MEAN,  # resolved from ``norm`` at start-up
            fbank_std=DATASET_STD,
        )
    )
    # One slice's mesh (slices add an outer data-parallel axis by themselves); FSDP over all
    # its chips: the recipes' global batches then fit 16 GiB v5e chips (docs/tpu.md).
    config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    config.sharding = "fsdp"  # dp | fsdp | tensor: logical-axis rules (cavmae_jax/sharding.py)
    config.init = ""  # official .pth, released name or model dir to start from ("": random)
    # position tables of init for another clip length: trim (first time patches) | interpolate
    config.init_positions = "trim"
    config.seed = 0
    config.batch_size = 48  # global batch per update
    config.epochs = 25  # updates per epoch: training clips // batch_size
    config.num_steps = 0  # > 0: the run's length in updates instead of epochs
    config.optimizer = "adam_l2"  # the official coupled-L2 Adam; "adamw" decoupled
    config.b1 = 0.95  # Adam's first-moment decay (the official 0.95)
    config.lr = 5e-5
    config.weight_decay = 5e-7
    config.clip_norm = 0.0  # 0: no clipping
    config.grad_accum = 1  # micro-batches the global batch is split into (same update)
    # the clips a contrastive loss compares under grad_accum: batch | micro_batch
    config.contrast_over = "batch"
    config.schedule = "multistep"  # official per-epoch MultiStep; "cosine": warmup + cosine
    config.warmup_epochs = 0.0
    config.lr_decay_start = 10
    config.lr_decay_every = 5
    config.lr_decay = 0.5
    config.log_every = 100
    config.checkpoint_every = 2000
    config.keep_checkpoints = 3
    # a jax.profiler trace of updates start_step.. (W/profile; steps 0: none)
    config.profile = ml_collections.ConfigDict({"start_step": 1, "steps": 0})
    config.checkpoint_ocdbt = True  # TensorStore's OCDBT format (False: a folder per array)
    config.restore_step = 0  # resume from this checkpoint; 0: the newest readable one
    config.peak_tflops = 0.0  # per device; 0: the device kind's published bf16 peak (peaks.py)
    config.evals = ml_collections.ConfigDict()  # evaluators: see cavmae_jax/evaluators.py
    return config
