"""The model's routing statistics (routed fraction per layer, regulariser) over several layers, padding and
head-wise decisions, against a per-layer computation written out here."""

from __future__ import annotations

import pytest
import torch

from l2a.models.modeling import _router_statistics


@pytest.mark.parametrize("penalty", ["squared", "l1"])
@pytest.mark.parametrize("heads", [None, 3], ids=["token-wise", "head-wise"])
@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "padding"])
def test_statistics_equal_the_per_layer_formula(penalty, heads, padded):
    g = torch.Generator().manual_seed(0)
    shape = (2, 5) if heads is None else (2, 5, heads)
    decisions = []
    for _ in range(4):
        soft = torch.rand(shape, generator=g, dtype=torch.float64)
        decisions.append((soft, soft > 0.6))
    valid = torch.tensor([[False, False, True, True, True], [True] * 5]) if padded else None
    fractions, regulariser = _router_statistics(decisions, valid, torch.device("cpu"), penalty)
    want_f, want_r = [], []
    for soft, hard in decisions:
        per_token = hard.double() if heads is None else hard.double().mean(-1)
        cost = soft if penalty == "l1" else soft**2
        cost = cost if heads is None else cost.sum(-1)
        w = torch.ones(2, 5, dtype=torch.float64) if valid is None else valid.double()
        want_f.append(float((per_token * w).sum() / w.sum()))
        want_r.append(float((cost * w).sum(-1).mean()))
    torch.testing.assert_close(fractions.double(), torch.tensor(want_f, dtype=torch.float64))
    torch.testing.assert_close(regulariser, torch.tensor(sum(want_r) / 4, dtype=torch.float64))


def test_no_global_layer_gives_empty_fractions_and_zero_regulariser():
    fractions, regulariser = _router_statistics([], None, torch.device("cpu"))
    assert fractions.shape == (0,) and float(regulariser) == 0.0
