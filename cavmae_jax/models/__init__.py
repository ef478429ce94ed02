"""The CAV-MAE model family in Flax NNX."""

from cavmae_jax.models.cav_mae import CAVMAE
from cavmae_jax.models.cav_mae_ft import CAVMAEFT, FT_MODES, CAVMAEFTAudio
from cavmae_jax.models.config import ModelConfig, tiny

__all__ = ["CAVMAE", "CAVMAEFT", "CAVMAEFTAudio", "FT_MODES", "ModelConfig", "tiny"]
