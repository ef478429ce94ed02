"""Demo: a small CAV-MAE pretrained for about a minute on CPU on generated audio-visual videos.

Launch (what ``make demo`` runs):

    cavmae prepare --demo 240 --output workdir/demo-data
    cavmae pretrain --config demo --workdir workdir/demo --config.data.dir=workdir/demo-data

The first writes 240 mp4 files (``input_pipeline/synthetic.py``: each of 8 classes pairs a
coloured shape with a sound) under ``workdir/demo-data/videos`` and prepares them; training then
reads them through the tf.data loader with the official pretraining augmentation (noise + time
roll). Inputs are full size (1024 x 128 fbank, 224 x 224
frame); the model is a narrow 4-layer CAV-MAE so that it trains in seconds per hundred steps.
The contrastive accuracy ``c_acc`` should climb well above chance (1 / batch_size).
Sized for a 2-core CPU; the full-size recipes are the official ViT-B ones.
"""

import ml_collections

from cavmae_jax.configs.common import CPU_PEAK_TFLOPS, TINY_MODEL, run_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = run_config("pretrain")
    config.model.update(TINY_MODEL)
    config.model.update(dict(norm_pix_loss=True, contrast_loss_weight=0.01))
    config.data.update(dict(classes=8))
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    config.sharding = "dp"
    config.peak_tflops = CPU_PEAK_TFLOPS
    config.checkpoint_every = 100
    config.batch_size = 16
    config.epochs = 20  # 240 clips / 16 = 15 updates per epoch: 300 updates
    config.log_every = 25
    config.lr = 1e-3
    config.mask_ratio_a = 0.75
    config.mask_ratio_v = 0.75
    config.mask_mode = "unstructured"
    return config  # no evaluators: `cavmae retrieval` evaluates the demo
