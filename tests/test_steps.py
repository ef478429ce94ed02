"""The one train step: accumulation inside the step, the applied learning rate, the state."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import random_inputs
from flax import nnx

from cavmae_jax.models import CAVMAEFT, tiny
from cavmae_jax.train.finetune import finetune_loss
from cavmae_jax.train.optim import make_optimizer, warmup_cosine
from cavmae_jax.train.steps import make_train_step


def initial_state(params, rest, tx) -> dict:
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": jax.tree.map(jnp.copy, params),
        "rest": rest,
        "opt_state": tx.init(params),
    }


@pytest.fixture(scope="module")
def classifier():
    cfg = tiny(label_dim=3)
    graphdef, params, rest = nnx.split(CAVMAEFT(cfg, nnx.Rngs(0)), nnx.Param, ...)
    audio, image = random_inputs(cfg, 8, seed=3)
    labels = np.eye(3, dtype=np.float32)[np.arange(8) % 3]
    return graphdef, params, rest, {"audio": audio, "image": image, "label": labels}


def test_micro_batches_under_warmup_cosine_equal_one_large_batch(classifier):
    """4 micro-batches of 2 clips = one update of 8 clips, for 4 updates through a warmup and a
    cosine (the schedule advances once per update, not per micro-batch). SGD with momentum:
    Adam's first steps are sign(g) and would amplify float32 rounding in near-zero gradients."""
    import optax

    graphdef, params, rest, batch = classifier
    schedule = warmup_cosine(0.5, 2, 4)
    tx = optax.sgd(schedule, momentum=0.9)
    loss = finetune_loss(graphdef, "multimodal", "bce")
    results = {}
    for accum in (1, 4):
        step = make_train_step(loss, tx, schedule, seed=0, grad_accum=accum)
        state, rates = initial_state(params, rest, tx), []
        for _ in range(4):
            state, metrics = step(state, batch)
            rates.append(float(metrics["lr"]))
        results[accum] = state, rates
    (one, rates_one), (four, rates_four) = results[1], results[4]
    assert int(four["step"]) == 4 and rates_four == rates_one
    assert rates_four == pytest.approx([float(schedule(i)) for i in range(4)])
    assert rates_four[0] == 0 and rates_four[2] == pytest.approx(0.5)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), four["params"], params)
    assert max(jax.tree.leaves(moved)) > 1e-3
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        four["params"],
        one["params"],
    )


def test_logged_rate_is_the_applied_rate():
    """Five updates of a least-squares problem with the official Adam under warmup + cosine,
    replayed by torch.optim.Adam with each update's lr set to the rate our step logged: the
    parameters agree, so the logged rate is the one applied at that update."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 5)).astype(np.float32)
    y = rng.standard_normal(16).astype(np.float32)
    w0 = rng.standard_normal(5).astype(np.float32)

    def loss_fn(params, state, batch, key):
        value = jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)
        return value, {"loss": value}

    schedule = warmup_cosine(0.1, 2, 5)
    tx = make_optimizer(schedule, {"w": w0}, weight_decay=1e-3)
    step = make_train_step(loss_fn, tx, schedule, seed=0, grad_accum=2)
    state = initial_state({"w": jnp.asarray(w0)}, {}, tx)
    weight = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    reference = torch.optim.Adam([weight], lr=0.0, betas=(0.95, 0.999), weight_decay=1e-3)
    rates = []
    for _ in range(5):
        state, metrics = step(state, {"x": x, "y": y})
        rates.append(float(metrics["lr"]))
        reference.param_groups[0]["lr"] = rates[-1]
        reference.zero_grad()
        torch.mean((torch.from_numpy(x) @ weight - torch.from_numpy(y)) ** 2).backward()
        reference.step()
    assert len(set(rates)) == 5  # the rate changed at every update
    np.testing.assert_allclose(state["params"]["w"], weight.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_indivisible_micro_batches_are_rejected():
    import ml_collections

    from cavmae_jax.sharding import make_mesh
    from cavmae_jax.train.setup import check_batch

    config = ml_collections.ConfigDict({"batch_size": 12, "grad_accum": 5})
    with pytest.raises(ValueError, match="does not split into 5 micro-batches"):
        check_batch(config, make_mesh({"data": 1}, jax.devices()[:1]))


def compiled_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_a_frozen_base_costs_its_forward_pass_and_the_heads_backward(classifier):
    """With ``freeze_base`` the head's gradient is the full model's and the base gets none; the
    compiled gradient costs the forward pass and hardly more (XLA runs no backward through the
    base), about a third of full finetuning, as ``flops.finetune_step`` counts."""
    from cavmae_jax import flops

    graphdef, params, rest, batch = classifier
    args = (params, {"rest": rest}, batch, jax.random.key(0))
    full, frozen = (finetune_loss(graphdef, "multimodal", "bce", f) for f in (False, True))
    grads_full, _ = jax.grad(full, has_aux=True)(*args)
    grads_frozen, _ = jax.grad(frozen, has_aux=True)(*args)
    for name, value in grads_frozen.items():
        if name == "mlp_head":
            jax.tree.map(
                partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7), value, grads_full[name]
            )
        else:
            assert all(not np.any(leaf) for leaf in jax.tree.leaves(value)), name
    forward = compiled_flops(full, *args)
    costs = {
        f: compiled_flops(jax.grad(loss, has_aux=True), *args)
        for f, loss in ((0, full), (1, frozen))
    }
    assert costs[1] == pytest.approx(forward, rel=0.01)
    cfg = tiny(label_dim=3)
    counted = flops.finetune_step(cfg, freeze_base=True) / flops.finetune_step(cfg)
    assert costs[1] / costs[0] == pytest.approx(counted, abs=0.03)


def pretraining_runs(cfg, accums, updates: int = 3, contrast_over: str = "batch") -> dict:
    """Parameters and metrics of ``updates`` SGD updates of CAV-MAE pretraining on one batch of
    8 clips, for each micro-batch count."""
    import optax

    from cavmae_jax.models import CAVMAE
    from cavmae_jax.train.pretrain import pretrain_loss, whole_batch_pretrain_loss

    graphdef, params, rest = nnx.split(CAVMAE(cfg, nnx.Rngs(0)), nnx.Param, ...)
    audio, image = random_inputs(cfg, 8, seed=5)
    masks = dict(mask_ratio_a=0.75, mask_ratio_v=0.75, mask_mode="unstructured")
    if contrast_over == "batch":
        loss = whole_batch_pretrain_loss(graphdef, cfg, masks)
    else:
        loss = pretrain_loss(graphdef, masks)
    tx = optax.sgd(0.5, momentum=0.9)
    results = {}
    for accum in accums:
        step = make_train_step(loss, tx, optax.constant_schedule(0.5), seed=1, grad_accum=accum)
        state = initial_state(params, rest, tx)
        for _ in range(updates):
            state, metrics = step(state, {"audio": audio, "image": image})
        results[accum] = state["params"], metrics
    return results


@pytest.mark.parametrize("groups, accum", [(1, 4), (2, 2)])
def test_micro_batches_take_the_contrastive_loss_over_the_whole_batch(groups, accum):
    """Gradient caching: micro-batches give the parameters and the loss_c / c_acc of one batch
    of 8, with the contrastive loss over all 8 clips (or its 2 official groups of 4, which mix
    rows of different micro-batches)."""
    cfg = tiny(contrast_loss_weight=1.0, loss_groups=groups)
    results = pretraining_runs(cfg, (1, accum), updates=2)
    (one, metrics_one), (params, metrics) = results[1], results[accum]
    assert float(metrics_one["loss_c"]) > 0.5
    for name in ("loss", "loss_c", "c_acc", "loss_mae"):
        assert float(metrics[name]) == pytest.approx(float(metrics_one[name]), rel=1e-5)
    jax.tree.map(partial(np.testing.assert_allclose, rtol=2e-4, atol=2e-6), params, one)


def test_per_micro_batch_negatives_remain_an_option():
    """``contrast_over="micro_batch"``: each micro-batch's contrastive loss sees its own 4 clips,
    as the official per-GPU loss; the training differs from the whole batch's."""
    cfg = tiny(contrast_loss_weight=1.0)
    whole = pretraining_runs(cfg, (2,), updates=1)[2]
    own = pretraining_runs(cfg, (2,), updates=1, contrast_over="micro_batch")[2]
    assert float(own[1]["loss_c"]) < float(whole[1]["loss_c"])  # fewer negatives, smaller loss


def test_the_whole_batch_contrastive_loss_costs_one_more_encoder_forward():
    """The embeddings' pass runs the encoder and its streams only (the decoder's outputs are
    unused there), as ``CAVMAEPretraining.clip_flops`` counts; the compiled programs agree."""
    import optax

    from cavmae_jax import flops
    from cavmae_jax.models import CAVMAE
    from cavmae_jax.train.pretrain import pretrain_loss, whole_batch_pretrain_loss

    cfg = tiny(contrast_loss_weight=1.0)
    graphdef, params, rest = nnx.split(CAVMAE(cfg, nnx.Rngs(0)), nnx.Param, ...)
    audio, image = random_inputs(cfg, 8)
    masks = dict(mask_ratio_a=0.75, mask_ratio_v=0.75, mask_mode="unstructured")
    tx = optax.sgd(0.1)
    state = initial_state(params, rest, tx)
    costs = {}
    for loss in (pretrain_loss(graphdef, masks), whole_batch_pretrain_loss(graphdef, cfg, masks)):
        step = make_train_step(loss, tx, optax.constant_schedule(0.1), seed=0, grad_accum=2)
        cost = step.lower(state, {"audio": audio, "image": image}).compile().cost_analysis()
        costs[type(loss).__name__] = (cost[0] if isinstance(cost, list) else cost)["flops"]
    counted = flops.pretrain_forward(cfg.replace(decoder_depth=0)) / flops.pretrain_step(cfg)
    assert costs["SplitLoss"] / costs["function"] - 1 == pytest.approx(counted, abs=0.06)
