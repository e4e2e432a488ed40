from __future__ import annotations

import math

import pytest
import torch


@pytest.mark.parametrize(
    ("name", "torch_class"),
    [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)],
)
def test_optimizers_build_with_recipe_options(registry, name, torch_class):
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = registry.create("optimizer", name, {"lr": 0.5, "weight_decay": 0.1}).build([param])
    assert type(optimizer) is torch_class
    assert (
        optimizer.param_groups[0]["lr"] == 0.5 and optimizer.param_groups[0]["weight_decay"] == 0.1
    )


def test_schedules_warm_up_then_decay(registry):
    cosine = registry.create("schedule", "cosine", {"warmup_steps": 4})
    assert [cosine.factor(s, 104) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine.factor(4, 104) == 1.0
    assert cosine.factor(54, 104) == pytest.approx(0.5)
    assert cosine.factor(104, 104) == pytest.approx(0.0, abs=1e-12)
    linear = registry.create("schedule", "linear", {})
    assert linear.factor(25, 100) == pytest.approx(0.75)
    constant = registry.create("schedule", "constant", {"warmup_steps": 2})
    assert [constant.factor(s, 10) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_schedule_drives_the_learning_rate(registry):
    param = torch.nn.Parameter(torch.ones(1))
    optimizer = registry.create("optimizer", "sgd", {"lr": 1.0, "momentum": 0.0}).build([param])
    scheduler = registry.create("schedule", "cosine", {}).build(optimizer, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 1.0 and lrs[5] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs == sorted(lrs, reverse=True)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("constant", {}),
        ("constant", {"warmup_steps": 3}),
        ("cosine", {}),
        ("cosine", {"warmup_steps": 3}),
        ("linear", {}),
    ],
)
def test_a_schedule_is_constant_only_when_every_factor_is_one(registry, name, options):
    # the engine skips stepping a constant schedule: it must really never change the rate
    schedule = registry.create("schedule", name, options)
    every_factor_one = all(schedule.factor(s, 50) == 1.0 for s in range(51))
    assert schedule.constant() == every_factor_one
    assert schedule.constant() == (name == "constant" and not options)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_fused_kernels_by_default_where_every_parameter_allows_them(registry, name):
    on_cpu = [torch.nn.Parameter(torch.ones(3))]
    assert registry.create("optimizer", name, {}).build(on_cpu).defaults["fused"] is True
    chosen = registry.create("optimizer", name, {"fused": False}).build(on_cpu)
    assert not chosen.defaults["fused"]
    # a device without fused kernels: torch's own default, not a refusal at the first step
    on_meta = [torch.nn.Parameter(torch.ones(3, device="meta"))]
    assert registry.create("optimizer", name, {}).build(on_meta).defaults["fused"] is None


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_fused_and_per_tensor_updates_agree(registry, name):
    options = {"lr": 0.01, "weight_decay": 0.1}
    weights = []
    for fused in (True, False):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, 4)), torch.nn.Parameter(torch.randn(4))]
        start = torch.cat([p.detach().flatten() for p in params])
        optimizer = registry.create("optimizer", name, {**options, "fused": fused}).build(params)
        gradients = torch.Generator().manual_seed(1)
        for _ in range(50):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gradients)
            optimizer.step()
        weights.append(torch.cat([p.detach().flatten() for p in params]))
        assert (weights[-1] - start).abs().min() > 1e-3  # every weight moved
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-6)
