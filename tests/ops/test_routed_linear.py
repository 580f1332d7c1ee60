"""`l2a.ops.routed_linear` (the decode steps' projection of routed rows) under the Triton interpreter against
a float64 reference; input errors."""

from __future__ import annotations

import os

import pytest
import torch

from l2a.ops import routed_linear

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


def _inputs(rows: int, k: int, n: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k**0.5
    b = torch.randn(n, generator=g, dtype=torch.float64) if bias else None
    return x, w, b


def _reference(x, w, b, active, residual=None):
    y = (x @ w.T + (0 if b is None else b)) * active[:, None].double()
    return y if residual is None else y + residual


triton_only = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1", reason="needs CUDA or TRITON_INTERPRET=1"
)


@triton_only
@pytest.mark.parametrize(
    "rows,k,n,routing,bias,residual,dtype",
    [
        (1, 96, 40, "all", True, False, torch.float32),  # K and N not multiples of the blocks
        (3, 64, 48, "mixed", False, False, torch.float32),
        (8, 64, 32, "none", True, False, torch.float32),  # no row routed: zeros, the weight unread
        (8, 64, 32, "none", True, True, torch.float32),  # no row routed: the residual itself
        (5, 128, 64, "mixed", True, False, torch.bfloat16),
        (5, 128, 64, "mixed", False, True, torch.bfloat16),
        (17, 32, 16, "mixed", False, True, torch.float32),  # a 32-row tile
    ],
)
def test_matches_float64_reference(rows, k, n, routing, bias, residual, dtype) -> None:
    pytest.importorskip("triton")
    x, w, b = _inputs(rows, k, n, dtype, bias)
    active = {
        "all": torch.ones(rows, dtype=torch.bool),
        "none": torch.zeros(rows, dtype=torch.bool),
        "mixed": torch.arange(rows) % 3 == 1,
    }[routing]
    r = (
        torch.randn(rows, n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        if residual
        else None
    )
    to = dict(device=DEVICE, dtype=dtype)
    with torch.no_grad():
        y = routed_linear(
            x.to(**to), w.to(**to), None if b is None else b.to(**to), active.to(DEVICE),
            residual=None if r is None else r.to(**to), backend="triton",
        )  # fmt: skip
    assert y.dtype == dtype and y.shape == (rows, n)
    rounded = [None if t is None else t.to(dtype).double() for t in (x, w, b, r)]
    expected = _reference(*rounded[:3], active, rounded[3])
    torch.testing.assert_close(y.double().cpu(), expected, **TOL[dtype])
    unrouted = y[~active.to(DEVICE)].cpu()  # exactly 0, or exactly the residual, on unrouted rows
    assert torch.equal(unrouted, torch.zeros_like(unrouted) if r is None else r.to(dtype)[~active])


@triton_only
def test_leading_dimensions_and_nan_inputs_of_unrouted_rows() -> None:
    """(B, N, K) inputs; an unrouted row's input is never read (NaN there leaves its output 0)."""
    pytest.importorskip("triton")
    x, w, b = _inputs(6, 64, 32, torch.float32, True, seed=1)
    active = torch.tensor([True, False, False, True, False, True])
    x_nan = x.clone()
    x_nan[~active] = float("nan")
    with torch.no_grad():
        y = routed_linear(
            x_nan.float().view(2, 3, 64).to(DEVICE), w.float().to(DEVICE), b.float().to(DEVICE),
            active.view(2, 3).to(DEVICE), backend="triton",
        )  # fmt: skip
    assert y.shape == (2, 3, 32)
    torch.testing.assert_close(
        y.view(6, 32).double().cpu(), _reference(x, w, b, active), atol=1e-5, rtol=1e-5
    )


def test_torch_backend_and_gradients_use_the_reference() -> None:
    x, w, b = _inputs(4, 16, 8, torch.float64, True)
    active = torch.tensor([True, False, True, True])
    wg = w.clone().requires_grad_()
    y = routed_linear(x, wg, b, active)  # needs a gradient: PyTorch on any device
    torch.testing.assert_close(y.detach(), _reference(x, w, b, active))
    (dw,) = torch.autograd.grad(y.sum(), wg)
    torch.testing.assert_close(dw, (x * active[:, None].double()).sum(0).expand(8, 16))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(weight=torch.zeros(8, 15)), "agree on K"),
        (dict(bias=torch.zeros(7)), "bias must have shape"),
        (dict(active=torch.ones(4)), "active must be bool"),
        (dict(active=torch.ones(3, dtype=torch.bool)), "active must be bool"),
        (dict(weight=torch.zeros(8, 16, dtype=torch.float64)), "one dtype"),
        (dict(residual=torch.zeros(4, 7)), "residual must be"),
    ],
)
def test_bad_inputs_name_the_problem(kwargs, message) -> None:
    args = dict(
        x=torch.zeros(4, 16),
        weight=torch.zeros(8, 16),
        bias=torch.zeros(8),
        active=torch.ones(4, dtype=torch.bool),
    )
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        routed_linear(args["x"], args["weight"], args["bias"], args["active"], residual=args.get("residual"))


def test_triton_backend_refuses_many_rows_or_gradients() -> None:
    pytest.importorskip("triton")
    from l2a.ops.linear import ROUTED_LINEAR_MAX_ROWS

    rows = ROUTED_LINEAR_MAX_ROWS + 1
    with pytest.raises(ValueError, match="at most"):
        routed_linear(
            torch.zeros(rows, 16),
            torch.zeros(8, 16),
            None,
            torch.ones(rows, dtype=torch.bool),
            backend="triton",
        )
