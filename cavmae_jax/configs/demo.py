"""Demo: a small CAV-MAE pretrained for about a minute on CPU on generated audio-visual videos.

Launch: ``cavmae pretrain --config configs/demo.py --workdir workdir/demo`` (what ``make demo``
runs). The first run writes ``data.clips`` mp4 files (``input_pipeline/synthetic.py``: each class
pairs a coloured shape with a sound) and prepares them with ``cavmae prepare`` under
``workdir/demo/data``; training then reads them through the tf.data loader with the official
pretraining augmentation (noise + time roll). Inputs are full size (1024 x 128 fbank, 224 x 224
frame); the model is a narrow 4-layer CAV-MAE so that it trains in seconds per hundred steps.
The contrastive accuracy ``c_acc`` should climb well above chance (1 / batch_size).
Sized for a 2-core CPU; the full-size recipes are the official ViT-B ones.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.trainer = "pretrain"
    config.model = ml_collections.ConfigDict(
        dict(
            embed_dim=64,
            depth=4,
            modality_specific_depth=3,
            num_heads=4,
            decoder_embed_dim=32,
            decoder_depth=2,
            decoder_num_heads=4,
            norm_pix_loss=True,
            contrast_loss_weight=0.01,
            attention="auto",
        )
    )
    config.data = ml_collections.ConfigDict(
        dict(
            dir="",
            train_split="train",
            generate=True,
            clips=240,
            classes=8,
            workers=2,
            noise=True,
            shuffle_buffer=1000,
        )
    )
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    config.sharding = "dp"  # dp | fsdp | tensor: logical-axis rules (cavmae_jax/sharding.py)
    config.peak_tflops = 0.48  # per device, for MFU (this 2-core CPU's float32 matmul peak)
    config.checkpoint_every = 100
    config.keep_checkpoints = 3
    # a jax.profiler trace of updates start_step.. (W/profile; steps 0: none)
    config.profile = ml_collections.ConfigDict({"start_step": 1, "steps": 0})
    config.checkpoint_ocdbt = True  # TensorStore's OCDBT format (False: a folder per array)
    config.restore_step = 0  # resume from this checkpoint; 0: the newest readable one
    config.init = ""  # official .pth or cavmae-jax model dir to start from ("" = random init)
    config.seed = 0
    config.batch_size = 16  # global batch per update
    config.epochs = 20  # 240 clips / 16 = 15 updates per epoch: 300 updates
    config.num_steps = 0  # > 0: the run's length in updates instead of epochs
    config.log_every = 25
    config.optimizer = "adam_l2"  # the official coupled-L2 Adam; "adamw" decoupled
    config.lr = 1e-3
    config.weight_decay = 5e-7
    config.clip_norm = 0.0  # 0: no clipping
    config.grad_accum = 1  # micro-batches the global batch is split into (same update)
    config.schedule = "multistep"  # official per-epoch MultiStep; "cosine": warmup + cosine
    config.warmup_epochs = 0.0
    config.lr_decay_start = 10
    config.lr_decay_every = 5
    config.lr_decay = 0.5
    config.mask_ratio_a = 0.75
    config.mask_ratio_v = 0.75
    config.mask_mode = "unstructured"
    config.evals = ml_collections.ConfigDict()  # none: `cavmae retrieval` evaluates the demo
    return config
