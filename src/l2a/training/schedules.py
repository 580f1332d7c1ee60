"""Step-indexed schedules: router regulariser weight λ(step), learning-rate factor, leakage draws.

All are pure functions of the optimizer step (0-based: the step about to be taken), so every rank computes
the same value without communication and a resumed run reproduces them.
"""

from __future__ import annotations

import math

import numpy as np

from l2a.training.config import OptimConfig, RouterConfig


def regularizer_weight(step: int, router: RouterConfig, total_steps: int) -> float:
    """λ at `step`: constant, or a linear / cosine ramp from 0 (step 0) to `regularizer_weight`
    reached at `regularizer_ramp_steps` (default `total_steps`) and held after."""
    weight = router.regularizer_weight
    if router.regularizer_schedule == "constant":
        return weight
    ramp = router.regularizer_ramp_steps or total_steps
    progress = min(max(step, 0) / ramp, 1.0)
    if router.regularizer_schedule == "linear":
        return weight * progress
    return weight * 0.5 * (1.0 - math.cos(math.pi * progress))


def lr_factor(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Learning-rate multiplier at `step`: linear warm-up (step+1)/warmup, then the decay schedule from 1
    down to `min_lr_ratio` at the last step (`total_steps - 1`)."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.lr_schedule == "constant":
        return 1.0
    decay_steps = max(total_steps - 1 - optim.warmup_steps, 1)
    progress = min((step - optim.warmup_steps) / decay_steps, 1.0)
    shape = 1.0 - progress if optim.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * shape


def leakage_draw(seed: int, step: int, probability: float) -> bool:
    """Whether `step` is a leakage step (dense global attention for all tokens).

    Drawn from a generator seeded by (seed, step) alone: every rank agrees without communication and a
    resumed run draws the same steps. The draws over steps are independent Bernoulli(probability).
    """
    if probability <= 0.0:
        return False
    if probability >= 1.0:
        return True
    # A fixed tag keeps this stream independent of other (seed, step)-seeded generators.
    rng = np.random.default_rng([seed, step, 0x1EA4])
    return bool(rng.random() < probability)
