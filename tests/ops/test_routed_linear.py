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


def _rope64(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, d: int) -> torch.Tensor:
    """float64 RoPE of y (B, T, H * D) by cos/sin (B or 1, T, D): (y1 c1 - y2 s1, y2 c2 + y1 s2)."""
    y = y.unflatten(-1, (-1, d))
    y1, y2 = y[..., : d // 2], y[..., d // 2 :]
    c, s = cos[:, :, None], sin[:, :, None]
    c1, c2, s1, s2 = c[..., : d // 2], c[..., d // 2 :], s[..., : d // 2], s[..., d // 2 :]
    return torch.cat([y1 * c1 - y2 * s1, y2 * c2 + y1 * s2], -1).flatten(-2)


@triton_only
@pytest.mark.parametrize(
    "b,t,heads,d,routing,bias,table_rows,dtype",
    [
        (1, 1, 3, 32, "all", True, 1, torch.float32),
        (2, 3, 2, 64, "mixed", False, 2, torch.float32),  # per-row tables
        (3, 1, 4, 16, "none", True, 1, torch.float32),
        (2, 2, 2, 128, "mixed", True, 2, torch.bfloat16),
    ],
)
def test_rotary_epilogue_matches_float64(b, t, heads, d, routing, bias, table_rows, dtype) -> None:
    """The queries' projection with RoPE in the kernel: each head of D columns rotated, independent
    tables per row or broadcast, unrouted rows exactly 0."""
    pytest.importorskip("triton")
    rows, k = b * t, 48
    x, w, bb = _inputs(rows, k, heads * d, dtype, bias, seed=2)
    g = torch.Generator().manual_seed(9)
    angles = torch.rand(table_rows, t, d // 2, generator=g, dtype=torch.float64) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    active = {"all": torch.ones(rows, dtype=torch.bool), "none": torch.zeros(rows, dtype=torch.bool)}.get(
        routing, torch.arange(rows) % 2 == 0
    )
    to = dict(device=DEVICE, dtype=dtype)
    with torch.no_grad():
        y = routed_linear(
            x.view(b, t, k).to(**to), w.to(**to), None if bb is None else bb.to(**to),
            active.view(b, t).to(DEVICE), rotary=(cos.to(**to), sin.to(**to)), backend="triton",
        )  # fmt: skip
    xr, wr = x.to(dtype).double().view(b, t, k), w.to(dtype).double()
    lin = xr @ wr.T + (0 if bb is None else bb.to(dtype).double())
    expected = _rope64(lin, cos.to(dtype).double(), sin.to(dtype).double(), d)
    expected = expected * active.view(b, t, 1).double()
    torch.testing.assert_close(y.double().cpu(), expected, **TOL[dtype])
    unrouted = y[~active.view(b, t).to(DEVICE)]
    assert torch.equal(unrouted, torch.zeros_like(unrouted))


def test_rotary_torch_backend_matches_float64_and_bad_tables_are_refused() -> None:
    x, w, _ = _inputs(2, 16, 32, torch.float64, False)
    angles = torch.rand(1, 2, 4, dtype=torch.float64)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    active = torch.tensor([[True, False]])
    y = routed_linear(x.view(1, 2, 16), w, None, active, rotary=(cos, sin), backend="torch")
    expected = _rope64((x @ w.T).view(1, 2, 32), cos, sin, 8) * active[..., None].double()
    torch.testing.assert_close(y, expected)
    with pytest.raises(ValueError, match="rotary needs"):
        routed_linear(x, w, None, active.view(2), rotary=(cos, sin))  # x not (B, T, K)
    with pytest.raises(ValueError, match="rotary needs"):
        routed_linear(x.view(1, 2, 16), w[:30], None, active, rotary=(cos, sin))  # N not a multiple of D
