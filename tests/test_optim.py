"""The official optimizer and schedule against PyTorch's Adam and MultiStepLR (spec 4.1)."""

from __future__ import annotations

import numpy as np
import optax
import pytest
import torch

from cavmae_jax.train.optim import multistep_schedule, official_adam


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


def test_as20k_recipe_rates_from_the_spec():
    sched = multistep_schedule(5e-5, 1, 5, 1, 0.5)
    rates = [float(sched(epoch - 1)) for epoch in range(1, 16)]
    assert rates[:5] == pytest.approx([5e-5] * 5)
    assert rates[5] == pytest.approx(2.5e-5)
    assert rates[14] == pytest.approx(4.88e-8, rel=1e-3)


def test_official_adam_equals_torch_adam_with_coupled_weight_decay():
    rng = np.random.default_rng(0)
    init = rng.standard_normal(6).astype(np.float32)
    grads = [rng.standard_normal(6).astype(np.float32) for _ in range(5)]
    param = torch.nn.Parameter(torch.from_numpy(init.copy()))
    opt = torch.optim.Adam([param], lr=1e-2, betas=(0.95, 0.999), eps=1e-8, weight_decay=0.1)
    tx = official_adam(1e-2, weight_decay=0.1)
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
