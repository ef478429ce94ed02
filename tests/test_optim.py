"""The official optimizer and schedule against PyTorch's Adam and MultiStepLR (behaviour 27)."""

from __future__ import annotations

import numpy as np
import optax
import pytest
import torch

from cavmae_jax.train.optim import make_optimizer, multistep_schedule, warmup_cosine


@pytest.mark.filterwarnings("ignore:Detected call of .lr_scheduler.step")
@pytest.mark.parametrize("start,every", [(5, 1), (2, 1), (10, 5)])
def test_schedule_equals_multistep_lr_stepped_per_epoch(start, every):
    steps_per_epoch, lr = 3, 5e-5
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(range(start, 1000, every)), gamma=0.5)
    ours = multistep_schedule(lr, steps_per_epoch, start, every, 0.5)
    for epoch in range(25):
        for i in range(steps_per_epoch):
            assert float(ours(epoch * steps_per_epoch + i)) == pytest.approx(
                opt.param_groups[0]["lr"]
            )
        sched.step()


def test_as20k_recipe_rates_per_epoch():
    sched = multistep_schedule(5e-5, 1, 5, 1, 0.5)
    rates = [float(sched(epoch - 1)) for epoch in range(1, 16)]
    assert rates[:5] == pytest.approx([5e-5] * 5)
    assert rates[5] == pytest.approx(2.5e-5)
    assert rates[14] == pytest.approx(4.88e-8, rel=1e-3)


@pytest.mark.parametrize("b1", [0.95, 0.9])
def test_official_adam_equals_torch_adam_with_coupled_weight_decay(b1):
    rng = np.random.default_rng(0)
    init = rng.standard_normal(6).astype(np.float32)
    grads = [rng.standard_normal(6).astype(np.float32) for _ in range(5)]
    param = torch.nn.Parameter(torch.from_numpy(init.copy()))
    opt = torch.optim.Adam([param], lr=1e-2, betas=(b1, 0.999), eps=1e-8, weight_decay=0.1)
    tx = make_optimizer(1e-2, init, "adam_l2", weight_decay=0.1, b1=b1)  # config.b1
    ours = init.copy()
    state = tx.init(ours)
    for g in grads:
        param.grad = torch.from_numpy(g.copy())
        opt.step()
        updates, state = tx.update(g, state, ours)
        ours = optax.apply_updates(ours, updates)
    np.testing.assert_allclose(ours, param.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_schedule_rejects_start_zero():
    with pytest.raises(ValueError, match="start >= 1"):
        multistep_schedule(1e-3, 10, 0, 1, 0.5)


def two_group_problem():
    rng = np.random.default_rng(1)
    params = {
        "blocks": rng.standard_normal(4).astype(np.float32),
        "mlp_head": rng.standard_normal(3).astype(np.float32),
    }
    grads = [
        {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
        for _ in range(4)
    ]
    return params, grads


def run(tx, params, grads):
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_head_lr_equals_torch_parameter_groups():
    params, grads = two_group_problem()
    base = torch.nn.Parameter(torch.from_numpy(params["blocks"].copy()))
    head = torch.nn.Parameter(torch.from_numpy(params["mlp_head"].copy()))
    opt = torch.optim.Adam(
        [{"params": [base], "lr": 1e-3}, {"params": [head], "lr": 1e-1}],
        betas=(0.95, 0.999),
        weight_decay=5e-7,
    )
    for g in grads:
        base.grad, head.grad = torch.from_numpy(g["blocks"]), torch.from_numpy(g["mlp_head"])
        opt.step()
    ours = run(make_optimizer(1e-3, params, head_lr=100.0), params, grads)
    np.testing.assert_allclose(ours["blocks"], base.detach().numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ours["mlp_head"], head.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_frozen_base_trains_only_the_head():
    params, grads = two_group_problem()
    ours = run(make_optimizer(1e-2, params, freeze_base=True), params, grads)
    np.testing.assert_array_equal(ours["blocks"], params["blocks"])
    assert not np.allclose(ours["mlp_head"], params["mlp_head"])


def test_clipping_and_adamw_and_cosine():
    params, grads = two_group_problem()
    scaled = [{k: 1e-6 * v for k, v in g.items()} for g in grads]  # clipping changes Adam here
    reference = optax.chain(
        optax.clip_by_global_norm(1e-6),
        optax.adamw(1e-2, b1=0.95, b2=0.999, eps=1e-8, weight_decay=0.1),
    )
    ours = run(
        make_optimizer(1e-2, params, kind="adamw", weight_decay=0.1, clip_norm=1e-6), params, scaled
    )
    expected = run(reference, params, scaled)
    unclipped = run(make_optimizer(1e-2, params, kind="adamw", weight_decay=0.1), params, scaled)
    for k in params:
        np.testing.assert_allclose(ours[k], expected[k], rtol=1e-6)
    assert not np.allclose(ours["blocks"], unclipped["blocks"], rtol=1e-6)
    schedule = warmup_cosine(1e-3, 10, 110)
    assert float(schedule(0)) == 0 and float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(110)) == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer(1e-3, params, kind="lamb")
