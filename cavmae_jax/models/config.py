"""Model configuration shared by the CAV-MAE family (defaults: the released ViT-B models)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes and switches of the CAV-MAE family.

    The paper's ablations are settings, not classes: ``modality_specific_depth=0`` with
    ``contrast_loss_weight=0`` is the vanilla AV-MAE (joint encoder only); ``decoder_depth=0``
    is CAV (contrastive only, no decoder).
    """

    img_size: int = 224
    audio_length: int = (
        1024  # fbank frames; must match the audio position table (official behaviour 15)
    )
    num_mel_bins: int = 128
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12  # modality-specific + shared layers
    modality_specific_depth: int = 11
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 512
    decoder_depth: int = 8  # 0: no decoder and no reconstruction loss (CAV)
    decoder_num_heads: int = 16
    norm_pix_loss: bool = False
    tr_pos: bool = False  # trainable encoder/decoder position tables
    mae_loss_weight: float = 1.0
    contrast_loss_weight: float = 0.01  # 0: no contrastive loss nor modality streams (AV-MAE)
    bidirect_contrast: bool = False
    loss_groups: int = 1  # 4 reproduces the official 4-GPU DataParallel loss
    # The official forward_encoder applies each shared block to the branch output instead of
    # chaining them (only the last one counts when there are several); True chains them.
    chain_shared_blocks: bool = False
    label_dim: int = 527  # classifier outputs (finetuning models only)
    dtype: str = "float32"  # compute dtype of matmuls; "bfloat16" on accelerators
    remat: str = "auto"  # auto | none | matmuls | full: what blocks keep (models/layers.py)
    attention: str = "auto"  # auto|xla|cudnn|recompute|flash|splash|grouped (models/attention.py)
    mlp: str = "auto"  # auto | xla | fused: the blocks' MLP (models/fused_mlp.py)

    def __post_init__(self):
        if isinstance(self.remat, bool):  # the older switch: True recomputed whole blocks
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if not 0 <= self.modality_specific_depth <= self.depth:
            raise ValueError(
                f"modality_specific_depth {self.modality_specific_depth} not in 0..{self.depth}"
            )
        for name in ("img_size", "audio_length", "num_mel_bins"):
            if getattr(self, name) % self.patch_size:
                raise ValueError(
                    f"{name} {getattr(self, name)} is not a multiple of the patch size"
                )

    @property
    def shared_depth(self) -> int:
        return self.depth - self.modality_specific_depth

    @property
    def audio_grid(self) -> tuple[int, int]:
        """(frequency rows, time columns) of the audio patch grid: 8 x 64 by default."""
        return self.num_mel_bins // self.patch_size, self.audio_length // self.patch_size

    @property
    def visual_grid(self) -> tuple[int, int]:
        return self.img_size // self.patch_size, self.img_size // self.patch_size

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def tiny(**changes) -> ModelConfig:
    """A small config for tests: 4x4 patches, 4 frequency x 8 time audio grid, 4x4 image grid."""
    base = dict(
        img_size=16,
        audio_length=32,
        num_mel_bins=16,
        patch_size=4,
        embed_dim=32,
        depth=3,
        modality_specific_depth=2,
        num_heads=4,
        decoder_embed_dim=16,
        decoder_depth=2,
        decoder_num_heads=2,
        label_dim=5,
    )
    base.update(changes)
    return ModelConfig(**base)
