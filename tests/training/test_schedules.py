"""λ(step) ramps, the learning-rate schedule and the leakage draws."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from l2a.training import OptimConfig, RouterConfig, leakage_draw, lr_factor, regularizer_weight


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("constant", [2.0, 2.0, 2.0, 2.0]),
        ("linear", [0.0, 1.0, 2.0, 2.0]),
        ("cosine", [0.0, 1.0, 2.0, 2.0]),
    ],
)
def test_regularizer_ramp(schedule, expected):
    router = RouterConfig(regularizer_weight=2.0, regularizer_schedule=schedule, regularizer_ramp_steps=10)
    got = [regularizer_weight(step, router, total_steps=100) for step in (0, 5, 10, 50)]
    assert got == pytest.approx(expected)
    if schedule == "cosine":
        # cosine ramp: 2 · (1 - cos(π/4)) / 2 at a quarter of the ramp, below the linear 0.5
        assert regularizer_weight(2.5, router, 100) == pytest.approx(1.0 - math.cos(math.pi / 4))


def test_ramp_defaults_to_the_whole_run():
    router = RouterConfig(regularizer_weight=1e-8, regularizer_schedule="linear")
    assert regularizer_weight(25, router, total_steps=100) == pytest.approx(0.25e-8)


def test_lr_warmup_then_cosine_to_min():
    optim = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1, lr_schedule="cosine")
    factors = [lr_factor(s, optim, total_steps=14) for s in range(14)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1)
    assert factors[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 9)))
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_leakage_rate(p):
    draws = [leakage_draw(seed=3, step=s, probability=p) for s in range(4000)]
    rate = sum(draws) / len(draws)
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / len(draws))


def test_leakage_depends_only_on_seed_and_step():
    first = [leakage_draw(7, s, 0.3) for s in range(200)]
    # global RNG state (what differs between ranks) must not matter
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    np.random.random(17)
    assert [leakage_draw(7, s, 0.3) for s in reversed(range(200))][::-1] == first
    assert [leakage_draw(8, s, 0.3) for s in range(200)] != first


def test_leakage_extremes():
    assert not any(leakage_draw(0, s, 0.0) for s in range(50))
    assert all(leakage_draw(0, s, 1.0) for s in range(50))
