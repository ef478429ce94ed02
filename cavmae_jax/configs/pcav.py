"""PCAV-MAE pretraining (the prototypical CAV-MAE draft, section 3.2; readings in docs/pcavmae.md).

Launch (one host; dataset from ``cavmae prepare``; init from the released IN-initial
``ori_mae_11.pth`` as CAV-MAE, an assumption: the draft names no initialisation; the encoder is
copied, the decoder of another size and the prototype projections keep their initialisation,
each named in the log):

    cavmae pretrain --config configs/pcav.py:as --workdir runs/pcav \\
        --config.data.dir=/data/audioset_2m --config.init=/ckpt/ori_mae_11.pth

Variants: ``as`` (AudioSet-2M) and ``vgg`` (VGGSound): 400 epochs, the decoder (eqs. 3 and 4)
for the first 200, AdamW (beta1 0.9), lr 2e-4 with 20 warmup epochs and a cosine ending at the
last update, a global batch of 512 per update (``batch_size``), split into ``grad_accum`` = 8
micro-batches of 64 inside the step (raise ``grad_accum`` if 64 clips do not fit your devices:
the schedule, the momentum encoder and the data position count updates either way), masking
50% audio / 75% visual. Updates per epoch come from the prepared dataset at start-up.
The paper reports, after finetuning, 57.8 mAP on AS-20K, 55.4 on AS-2M, 69.9% on VGGSound;
nobody has reproduced them (no public code) and no hardware is stated.
``demo`` (also ``as,tiny``): a narrow model on the generated demo data (``cavmae prepare --demo
240 --output DIR``), sized for a 2-core CPU:
the PCAV-MAE side of the comparison in docs/pcavmae.md.
"""

import ml_collections

from cavmae_jax.configs import variant
from cavmae_jax.configs.common import CPU_PEAK_TFLOPS, TINY_MODEL, run_config
from cavmae_jax.errors import UserError
from cavmae_jax.models.pcav_mae import PAPER_SIZES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name, modifiers = variant(arg, "as")
    if name not in ("as", "vgg", "demo"):
        raise UserError(f"unknown recipe {name!r}; expected as, vgg or demo")
    tiny = name == "demo" or "tiny" in modifiers
    config = run_config("pcav")
    config.model.update(PAPER_SIZES)
    config.pcav = ml_collections.ConfigDict(
        dict(
            tau=0.1,  # eqs. (1), (3): the temperature
            beta=10.0,  # eq. (2) smoothing
            # where tau acts: "paper" = eq. (2) gammas as they are and the loss divided by tau
            # (eqs. 1, 3 as written); "pcl" = gammas rescaled to mean tau (PCL), no 1 / tau
            scale="paper",
            # the momentum encoder that produces the clustered features: momentum from this
            # half-life in epochs when > 0 (printed at start-up), else ema_momentum
            ema_half_life_epochs=0.0,
            ema_momentum=0.999,
            warmup_epochs=0.0,  # epochs of reconstruction alone before the prototype terms
            # CAV-MAE's InfoNCE between the two streams: off | warmup (in the warm-up only) |
            # always, at infonce_weight (CAV-MAE's 0.1 of the contrastive recipes)
            infonce="off",
            infonce_weight=0.1,
            # eq. (1) both ways (visible visual tokens against audio prototypes too): without
            # it the visual stream gets no gradient (docs/pcavmae.md)
            symmetric_pje=False,
            decoder_first=True,  # the decoder phase first (the paper's order), else last
            method="density",  # density (xDNN-style peaks, real clips) | kmeans (PCL)
            granularities=(100, 400, 1600),  # neighbourhood sizes (density) or k (kmeans)
            max_prototypes=20_000,
            decoder_epochs=200,
            pje_weight=1.0,  # eq. (1) in the total loss; 0 = the ablation without L_PJE
            pcpe_weight=1.0,  # eq. (3) in the total loss; 0 = the ablation without L_PCPE
            # the memory-bank refresh (momentum embeddings of every clip, then the prototypes):
            # before the first update, then every epoch (every_steps wins when set)
            refresh=dict(every_epochs=1, every_steps=0, at_start=True),
        )
    )
    config.batch_size = 512  # the paper's (accumulated) global batch per update
    config.grad_accum = 8  # in micro-batches of 64
    config.epochs = 400
    config.optimizer = "adamw"
    config.b1 = 0.9
    config.lr = 2e-4
    config.weight_decay = 0.05  # not in the paper: the MAE value
    config.schedule = "cosine"  # not in the paper: MAE's warmup + cosine
    config.warmup_epochs = 20.0
    config.mask_ratio_a = 0.5
    config.mask_ratio_v = 0.75
    if tiny:
        config.model.update(TINY_MODEL)
        config.pcav.update(dict(granularities=(5, 15), max_prototypes=64, decoder_epochs=10_000))
        config.data.update(dict(classes=8))
        config.batch_size = 16
        config.grad_accum = 1
        config.epochs = 20  # 240 clips: 15 updates per epoch
        config.lr = 1e-3
        config.weight_decay = 5e-7
        config.schedule = "multistep"
        config.warmup_epochs = 0.0
        config.log_every = 25
        config.checkpoint_every = 100
        config.peak_tflops = CPU_PEAK_TFLOPS
    return config
