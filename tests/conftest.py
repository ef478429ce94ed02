"""Shared fixtures: tiny configs, random official-style state dicts, inputs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Compiled XLA executables are reused across the test processes (the subprocess runs of the
# trainer compile the same steps again and again): set before JAX is imported, inherited by
# every subprocess. Results are unchanged: a cached executable is the one that was compiled.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "cavmae-jax-tests-xla-cache")
)

# Tests run tiny models for a few steps, so their time is XLA compilation: the backend's
# optimisation is off (the code under test is unchanged). The demo learning test, which is
# about speed, trains without this flag; the JAX fbank's parity is checked at the default level.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0"

# The test environment has libtpu (for compile-only TPU checks); the tests themselves run on the
# CPU, and without this every process would first try to start a TPU runtime.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np
import pytest

from cavmae_jax import convert
from cavmae_jax.models import ModelConfig, tiny

DATA = Path(__file__).with_name("data")  # fixtures: tests/data/README.md
# Full-size inputs (1024 x 128 fbank, 224 x 224 frames) with a narrow two-layer encoder: what
# the sample clips can be fed to in a few seconds.
NARROW_FULL_INPUTS = ModelConfig(
    embed_dim=64,
    depth=2,
    modality_specific_depth=1,
    num_heads=1,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=1,
)


def random_state_dict(kind: str, cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Official names and shapes of ``kind`` at ``cfg``, filled with random values
    (norm weights near 1, everything else small), so that every parameter matters."""
    model = convert._abstract(kind, cfg)
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in convert.official_shapes(model).items():
        value = rng.standard_normal(shape).astype(np.float32)
        parts = name.split(".")
        is_norm_weight = len(parts) > 1 and "norm" in parts[-2] and parts[-1] == "weight"
        is_norm_weight |= name == "mlp_head.0.weight"
        out[name] = (1 + 0.2 * value) if is_norm_weight else 0.2 * value
    return out


def random_inputs(cfg: ModelConfig, batch: int, seed: int = 0):
    """Audio [B, T, F] and NHWC image [B, H, W, 3] as float32 NumPy arrays."""
    rng = np.random.default_rng(seed)
    audio = rng.standard_normal((batch, cfg.audio_length, cfg.num_mel_bins)).astype(np.float32)
    image = rng.standard_normal((batch, cfg.img_size, cfg.img_size, 3)).astype(np.float32)
    return audio, image


@pytest.fixture
def cfg() -> ModelConfig:
    return tiny()


@pytest.fixture
def key() -> jax.Array:
    return jax.random.key(0)
