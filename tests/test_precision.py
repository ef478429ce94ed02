"""bfloat16 compute against float32 on the same parameters and data: the difference in losses,
gradient norms and features stays within the bounds stated in ``docs/speed.md``."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from conftest import random_inputs
from flax import nnx

from cavmae_jax.models import CAVMAE, tiny
from cavmae_jax.train.optim import official_adam
from cavmae_jax.train.pretrain import pretrain_loss
from cavmae_jax.train.steps import make_train_step

UPDATES = 8
LOSS_BOUND = 0.002  # relative, every update (measured: at most 5e-4)
GRAD_NORM_BOUND = 0.02  # relative, every update (measured: at most 8e-3)
FEATURE_BOUND = 0.02  # relative Frobenius error of the token features (measured: 5.5e-3)


def trajectory(dtype: str, audio, image) -> tuple[list[float], list[float], dict]:
    cfg = tiny(norm_pix_loss=True, contrast_loss_weight=0.01, dtype=dtype, embed_dim=64)
    graphdef, params, rest = nnx.split(CAVMAE(cfg, nnx.Rngs(0)), nnx.Param, ...)
    tx = official_adam(1e-3)
    masks = dict(mask_ratio_a=0.75, mask_ratio_v=0.75, mask_mode="unstructured")
    step = make_train_step(pretrain_loss(graphdef, masks), tx, lambda _: 1e-3, seed=0)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "rest": rest}
    state["opt_state"] = tx.init(params)
    losses, norms = [], []
    for _ in range(UPDATES):
        state, metrics = step(state, {"audio": audio, "image": image})
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    model = nnx.merge(graphdef, state["params"], rest)
    return losses, norms, model


def test_bfloat16_training_stays_within_the_stated_bounds_of_float32():
    """Eight official-Adam updates from the same initialisation on the same clips (same masks:
    the key depends on the update only): every update's loss and gradient norm, and the final
    model's features (the float32 model's parameters in both compute dtypes)."""
    cfg = tiny()
    audio, image = random_inputs(cfg, 8, seed=1)
    loss32, norm32, model32 = trajectory("float32", audio, image)
    loss16, norm16, _ = trajectory("bfloat16", audio, image)
    loss_error = np.abs(np.subtract(loss16, loss32)) / np.abs(loss32)
    norm_error = np.abs(np.subtract(norm16, norm32)) / np.abs(norm32)
    assert loss32[-1] < loss32[0]  # the run trains
    assert loss_error.max() < LOSS_BOUND, loss_error
    assert norm_error.max() < GRAD_NORM_BOUND, norm_error

    graphdef, state = nnx.split(model32)
    bf16 = nnx.merge(
        nnx.split(CAVMAE(model32.cfg.replace(dtype="bfloat16"), nnx.Rngs(0)))[0], state
    )
    features = zip(bf16.forward_feat(audio, image), model32.forward_feat(audio, image), strict=True)
    for got, want in features:
        assert got.dtype == jnp.float32  # the final norms return float32
        error = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
        assert error < FEATURE_BOUND, error
