"""The CAV-MAE finetuning recipes of the official ``egs/`` scripts (AudioSet, VGGSound).

Launch (one host; datasets from ``cavmae prepare``, the init is the released CAV-MAE-Scale++
``audio_model.21.pth`` or a ``cavmae pretrain`` model directory):

    cavmae finetune --config configs/finetune.py:as20k --workdir runs/as20k \\
        --config.data.dir=/data/as20k --config.data.eval_dir=/data/as_eval \\
        --config.init=/ckpt/audio_model.21.pth

Variants (batch / lr / head_lr / epochs / decay from epoch; official final figure, weight-averaged
and 10-frame; hardware of the official run, 4 GPUs each):
  as20k            36 / 5e-5 / 100 / 15 / 5  AS-20K audio-visual: mAP 42.2   (~1.8 h)
  as20k-audioonly  36 / 5e-5 / 100 / 15 / 5  AS-20K audio: mAP 38.3 (one pass, frame 5)
  as20k-videoonly  36 / 5e-5 / 100 / 15 / 5  AS-20K visual: mAP 20.0
  as2m             48 / 1e-5 /  50 / 10 / 2  AS-2M audio-visual, balanced: mAP 51.1 (~10 days)
  as2m-audioonly   48 / 1e-5 /  50 / 10 / 2  AS-2M audio, balanced: mAP 46.6
  vgg              48 / 1e-4 /  10 / 10 / 2  VGGSound audio-visual, balanced, CE: acc 65.8 (~5.5 h)
  custom           24 / 5e-5 / 100 / 15 / 5  your own labelled clips (docs/own_data.md)
  custom-audioonly 24 / 5e-5 / 100 / 15 / 5  your own audio files (prepared with --no-video blank)
Append ``,tiny`` for a CPU-sized model on the generated demo data (``cavmae prepare --demo 48
--output DIR``, 8 classes; evaluated on its own training split, since that dataset has only one).

``custom`` takes from the prepared dataset (``cavmae prepare``'s ``dataset.json``) the class
count, the loss (BCE and mAP when some clip has several labels, else cross-entropy and
accuracy), the clip length and the fbank statistics (``data.norm = "dataset"``). Its other
settings are AS-20K's, the official recipe for the smallest dataset, with the batch halved for
datasets of a few thousand clips and the time mask scaled to a 5-second clip (96 of 512
frames); ``--config.freeze_base=True`` trains the head only.

All use SpecAugment (freqm 48, timem 192), mixup 0.5, label smoothing 0.1, noise, the official
Adam with the head at ``head_lr`` x lr, the per-epoch MultiStep halving every epoch, weight
averaging over the recipe's epochs and the 10-frame ensemble at the end (audio-only: frame 5).
"""

import ml_collections

from cavmae_jax.configs import variant
from cavmae_jax.configs.common import CPU_PEAK_TFLOPS, TINY_MODEL, run_config
from cavmae_jax.errors import UserError

RECIPES = {
    "as20k": dict(
        mode="multimodal",
        batch=36,
        lr=5e-5,
        head_lr=100,
        epochs=15,
        start=5,
        wa=(3, 15),
        classes=527,
        loss="bce",
        balanced=False,
        eval_split="eval",
    ),
    "as2m": dict(
        mode="multimodal",
        batch=48,
        lr=1e-5,
        head_lr=50,
        epochs=10,
        start=2,
        wa=(1, 10),
        classes=527,
        loss="bce",
        balanced=True,
        eval_split="eval",
    ),
    "vgg": dict(
        mode="multimodal",
        batch=48,
        lr=1e-4,
        head_lr=10,
        epochs=10,
        start=2,
        wa=(3, 10),
        classes=309,
        loss="ce",
        balanced=True,
        eval_split="test",
    ),
    "custom": dict(
        mode="multimodal",
        batch=24,
        lr=5e-5,
        head_lr=100,
        epochs=15,
        start=5,
        wa=(3, 15),
        classes=0,  # the dataset's
        loss="auto",  # the dataset's: bce if multi-label, else ce
        balanced=False,
        eval_split="eval",
    ),
}
MODES = {"audioonly": "audioonly", "videoonly": "videoonly"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name, modifiers = variant(arg, "as20k")
    base, _, mode = name.partition("-")
    if base not in RECIPES or (mode and mode not in MODES) or name == "vgg-audioonly":
        known = [*RECIPES, "as20k-audioonly", "as20k-videoonly", "as2m-audioonly"]
        known.append("custom-audioonly")
        raise UserError(f"unknown recipe {name!r}; expected one of {known}")
    recipe = RECIPES[base]
    config = run_config("finetune")
    config.model.update(
        dict(
            label_dim=recipe["classes"],
            tr_pos=True,  # CAVMAEFT trains its position embeddings (official behaviour 8)
        )
    )
    config.data.update(
        dict(
            eval_dir="",  # evaluation dataset ("" = the training dataset)
            eval_split=recipe["eval_split"],
            classes=recipe["classes"],
            freqm=48,
            timem=192,
            mixup=0.5,
            # official mixup mixes waveforms (`cavmae prepare --keep-waveform`); True allows
            # the fbank-domain approximation for a dataset that stores none
            mixup_approx=False,
            label_smooth=0.1,
            balanced=recipe["balanced"],  # official --bal: label-balanced weighted sampling
        )
    )
    config.mode = mode or recipe["mode"]  # or "multimodal_sum" (PCAV-MAE: + both streams)
    config.loss = recipe["loss"]  # bce (mAP tasks) | ce (accuracy tasks)
    # final evaluation: 10 = mean over frames 0..9 (official); 1 = frame 5 (audio-only models)
    config.eval_frames = 1 if config.mode == "audioonly" else 10
    config.batch_size = recipe["batch"]
    config.epochs = recipe["epochs"]
    config.lr = recipe["lr"]
    config.head_lr = float(recipe["head_lr"])
    config.freeze_base = False  # True: linear probe (head only)
    config.lr_decay_start = recipe["start"]
    config.lr_decay_every = 1
    config.lr_decay = 0.5
    config.wa = True
    config.wa_start, config.wa_end = recipe["wa"]
    config.checkpoint_every = 1000
    # the official per-epoch validation: frame 5, full batches (cavmae_jax/evaluators.py)
    config.evals = ml_collections.ConfigDict(
        {"validation": dict(kind="classification", every_epochs=1, every_steps=0)}
    )
    if base == "custom":
        config.model.audio_length = 0  # the dataset's
        config.data.update(dict(norm="dataset", timem=96))
        config.evals.validation.drop_last = False  # a small held-out fold: every clip counts
    if "tiny" in modifiers:
        config.model.update(TINY_MODEL)
        config.model.update(dict(decoder_depth=0))
        if base != "custom":
            config.model.label_dim = 8
            config.data.update(dict(classes=8, eval_split="train"))
        config.data.mixup_approx = True  # the generated demo clips keep no waveform
        config.batch_size = 8
        config.epochs = 3
        config.lr = 1e-4
        config.lr_decay_start = 2
        config.wa_start, config.wa_end = 2, 3
        config.log_every = 2
        config.checkpoint_every = 6
        config.peak_tflops = CPU_PEAK_TFLOPS
    return config
