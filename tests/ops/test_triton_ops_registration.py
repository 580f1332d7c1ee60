"""The Triton attention kernels as `torch.library` custom ops: schema, fake kernels, autograd, compile;
and the kernel-specific input errors."""

from __future__ import annotations

import os

import pytest
import torch

from l2a.ops import conditional_attention, sliding_window_attention

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import l2a.ops.triton  # noqa: E402, F401  (registers torch.ops.l2a.*)

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _qkv(n: int = 20, hq: int = 4, hkv: int = 2, d: int = 32, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, n, hq, d, generator=g).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(1, n, hkv, d, generator=g).to(DEVICE, dtype).requires_grad_()
    v = torch.randn(1, n, hkv, d, generator=g).to(DEVICE, dtype).requires_grad_()
    return q, k, v


def test_conditional_op_passes_opcheck() -> None:
    q, k, v = _qkv()
    active = torch.arange(20, device=DEVICE) % 3 == 0
    args = (q, k, v, active[None], 0.2, 1, None, torch.tensor([2], device=DEVICE))
    torch.library.opcheck(torch.ops.l2a.conditional_attention.default, args)


def test_sliding_window_op_passes_opcheck() -> None:
    q, k, v = _qkv()
    torch.library.opcheck(torch.ops.l2a.sliding_window_attention.default, (q, k, v, 5, 0.2, None, None))


def test_compiles_fullgraph_without_graph_break() -> None:
    q, k, v = _qkv()
    active = (torch.arange(20, device=DEVICE) % 2 == 0)[None]

    def f(q, k, v):
        far, lse_far = conditional_attention(q, k, v, active, key_offset=4, return_lse=True, backend="triton")
        near, lse_near = sliding_window_attention(q, k, v, 4, return_lse=True, backend="triton")
        return (far * 2 + near).sum() + torch.logaddexp(lse_far, lse_near).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    expected = torch.autograd.grad(f(q, k, v), (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("d", [48, 256], ids=lambda d: f"D{d}")
def test_unsupported_head_dim_is_a_clear_error(d: int) -> None:
    q, k, v = _qkv(d=d)
    with pytest.raises(ValueError, match="head_dim"):
        sliding_window_attention(q, k, v, 4, backend="triton")


def test_float64_is_a_clear_error() -> None:
    q, k, v = _qkv(dtype=torch.float64)
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        conditional_attention(q, k, v, torch.ones(1, 20, dtype=torch.bool, device=DEVICE), backend="triton")


def test_strided_inputs_match_contiguous_ones() -> None:
    """q, k, v as views into fused projections (row strides larger than Hq·D) give the same result."""
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(1, 24, 4 + 2 + 2, 32, generator=g).to(DEVICE).requires_grad_()
    q, k, v = qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:]
    active = (torch.arange(24, device=DEVICE) % 3 != 1)[None]
    out = conditional_attention(q, k, v, active, backend="triton")
    dout = torch.randn(out.shape, generator=g).to(DEVICE)
    (grad,) = torch.autograd.grad(out, qkv, dout)
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    out_c = conditional_attention(qc, kc, vc, active, backend="triton")
    grads_c = torch.autograd.grad(out_c, (qc, kc, vc), dout)
    torch.testing.assert_close(out, out_c)
    torch.testing.assert_close(grad, torch.cat(grads_c, dim=2))


@pytest.mark.parametrize("op", ["rms_norm", "rotary", "swiglu"])
def test_elementwise_ops_pass_opcheck(op: str) -> None:
    from l2a.ops.triton.rmsnorm import rms_norm_op
    from l2a.ops.triton.rotary import rotary_op
    from l2a.ops.triton.swiglu import swiglu_op

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 2, 16, generator=g).to(DEVICE).requires_grad_()
    if op == "rms_norm":
        weight = torch.randn(16, generator=g).to(DEVICE).requires_grad_()
        torch.library.opcheck(rms_norm_op, (x, weight, 1e-6, torch.bfloat16))
        torch.library.opcheck(rms_norm_op, (x, weight, 1e-6, None))
    elif op == "rotary":
        angles = torch.rand(2, 6, 16, generator=g).to(DEVICE)
        torch.library.opcheck(rotary_op, (x, angles.cos(), angles.sin(), None))
    else:
        torch.library.opcheck(swiglu_op, (x,))


def test_eager_calls_without_gradient_skip_the_custom_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_flash.dispatch`: eager calls that need no gradient launch the kernel directly (the custom op's
    dispatch costs host time); calls that need one go through the op, which holds the autograd formula."""
    from l2a.ops import rms_norm
    from l2a.ops.triton import rmsnorm

    class OpCalled(Exception):
        pass

    def op(*_args):
        raise OpCalled

    monkeypatch.setattr(rmsnorm, "rms_norm_op", op)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(16, generator=g, dtype=torch.float64)
    expected = weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    xt, wt = x.float().to(DEVICE), weight.float().to(DEVICE)
    with torch.no_grad():
        y = rms_norm(xt, wt.requires_grad_(), 1e-6, backend="triton")
    torch.testing.assert_close(y.double().cpu(), expected, rtol=1e-5, atol=1e-5)
    assert rms_norm(xt, wt.detach(), 1e-6, backend="triton").shape == x.shape  # no input needs a gradient
    with pytest.raises(OpCalled):
        rms_norm(xt, wt.detach().requires_grad_(), 1e-6, backend="triton")
