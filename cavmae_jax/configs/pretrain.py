"""The CAV-MAE pretraining recipes of the official ``egs/`` scripts and the paper's ablations.

Launch (one host; the dataset comes from ``cavmae prepare``, the init is the released
IN-initial ``ori_mae_11.pth`` or, for ``vgg-from-as``, CAV-MAE-Scale++ ``audio_model.21.pth``):

    cavmae pretrain --config configs/pretrain.py:as-scale++ --workdir runs/scale++ \\
        --config.data.dir=/data/audioset_2m --config.init=/ckpt/ori_mae_11.pth

Variants (batch / lr / epochs; official figure; hardware the official run used):
  as-base      48 / 5e-5 / 25  CAV-MAE-Base: eval c_acc 0.798 after 25 epochs (4 x 12 GB GPUs)
  as-scale+   120 / 1e-4 / 25  CAV-MAE-Scale+ (released: batch 108, epoch 25) (4 x 24 GB)
  as-scale++  256 / 2e-4 / 25  CAV-MAE-Scale++ (released: epoch 21) (4 x 48 GB)
  vgg         120 / 1e-4 / 25  VGGSound from IN-initial: eval c_acc 0.636 (4 GPUs)
  vgg-from-as 120 / 5e-5 / 10  VGGSound continued from Scale++: eval c_acc 0.754 (4 GPUs)
  avmae, cav, mask-time, mask-freq, mask-tf, mask-50, mask-65, mask-85: ablations on as-base.
Append ``,tiny`` (e.g. ``as-base,tiny``) for a CPU-sized model on the generated demo data
(``cavmae prepare --demo 48 --output DIR``, then ``--config.data.dir=DIR``).

All use masking 0.75 unstructured, contrast weight 0.01, norm_pix_loss, fixed positions, the
official Adam (0.95, 0.999, L2 5e-7) and MultiStep(10, 5, 0.5) per epoch. Batches are global and
the contrastive negatives are the whole global batch; ``--config.model.loss_groups=4``
reproduces the official 4-GPU DataParallel loss (negatives per quarter batch, summed losses).
Durations are epochs; updates per epoch come from the prepared dataset at start-up (the
official AudioSet-2M list has 1,772,023 training clips: 36,917 updates of 48 per epoch for
``as-base``; a partial download has fewer, and the recipe still runs 25 epochs of it).
"""

import ml_collections

from cavmae_jax.configs import variant
from cavmae_jax.configs.common import CPU_PEAK_TFLOPS, TINY_MODEL, run_config
from cavmae_jax.errors import UserError

RECIPES = {
    "as-base": dict(batch=48, lr=5e-5, epochs=25),
    "as-scale+": dict(batch=120, lr=1e-4, epochs=25),
    "as-scale++": dict(batch=256, lr=2e-4, epochs=25),
    "vgg": dict(batch=120, lr=1e-4, epochs=25),
    "vgg-from-as": dict(batch=120, lr=5e-5, epochs=10),
}
ABLATIONS = {
    "avmae": dict(modality_specific_depth=0, contrast_loss_weight=0.0),
    "cav": dict(decoder_depth=0),
    "mask-time": {},
    "mask-freq": {},
    "mask-tf": {},
    "mask-50": {},
    "mask-65": {},
    "mask-85": {},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name, modifiers = variant(arg, "as-base")
    recipe = RECIPES.get(name, RECIPES["as-base"])
    if name not in RECIPES and name not in ABLATIONS:
        raise UserError(f"unknown recipe {name!r}; expected one of {[*RECIPES, *ABLATIONS]}")
    config = run_config("pretrain")
    config.model.update(
        dict(
            norm_pix_loss=True,
            contrast_loss_weight=0.01,
            decoder_depth=8,
            loss_groups=1,
        )
    )
    config.model.update(ABLATIONS.get(name, {}))
    config.batch_size = recipe["batch"]
    config.epochs = recipe["epochs"]
    config.lr = recipe["lr"]
    config.mask_ratio_a = config.mask_ratio_v = 0.75
    config.mask_mode = "unstructured"
    if name.startswith("mask-"):
        kind = name.removeprefix("mask-")
        if kind.isdigit():
            config.mask_ratio_a = config.mask_ratio_v = int(kind) / 100
        else:
            config.mask_mode = {"tf": "tf", "time": "time", "freq": "freq"}[kind]
    if "tiny" in modifiers:
        ablated = (config.model.modality_specific_depth, config.model.decoder_depth)
        config.model.update(TINY_MODEL)
        config.model.modality_specific_depth = min(3, ablated[0])
        config.model.decoder_depth = min(2, ablated[1])
        config.data.update(dict(classes=8))
        config.batch_size = 8
        config.epochs = 2  # 48 clips: 6 updates per epoch
        config.log_every = 4
        config.checkpoint_every = 6
        config.peak_tflops = CPU_PEAK_TFLOPS
    return config
