"""Demo: a small CAV-MAE pretrained for a minute on CPU on generated audio-visual batches.

Launch: ``cavmae pretrain --config configs/demo.py --workdir workdir/demo`` (what ``make demo``
runs). The batches are generated in memory (``cavmae_jax/train/synthetic_batches.py``): each clip's
spectrogram band and image colour come from one of ``classes`` classes, so the contrastive
accuracy ``c_acc`` should rise well above chance (1/batch_size) within the run.
Sized for a 2-core CPU; the full-size recipes are the official ViT-B ones.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(
        dict(
            img_size=32, audio_length=64, num_mel_bins=32, patch_size=8, embed_dim=64, depth=4,
            modality_specific_depth=3, num_heads=4, decoder_embed_dim=32, decoder_depth=2,
            decoder_num_heads=4, norm_pix_loss=True, contrast_loss_weight=0.01,
        )
    )  # fmt: skip
    config.seed = 0
    config.batch_size = 16
    config.classes = 4
    config.num_steps = 300
    config.log_every = 25
    config.lr = 1e-3
    config.weight_decay = 5e-7
    config.steps_per_epoch = 100
    config.lr_decay_start = 2
    config.lr_decay_every = 1
    config.lr_decay = 0.5
    config.mask_ratio_a = 0.75
    config.mask_ratio_v = 0.75
    config.mask_mode = "unstructured"
    return config
