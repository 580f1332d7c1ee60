"""Fused rotary kernel against the float64 formula (values and the gradient of x), with strided inputs
(views into a fused projection) and cos/sin shared over the batch; the dtype follows the PyTorch formula."""

from __future__ import annotations

import os

import pytest
import torch

from l2a.ops.rotary import apply_rotary, rotary_reference

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _float64_rotary(x, cos, sin):
    x, cos, sin = x.double(), cos.double()[:, :, None], sin.double()[:, :, None]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat(
        [x1 * cos[..., :half] - x2 * sin[..., :half], x2 * cos[..., half:] + x1 * sin[..., half:]], -1
    )


@pytest.mark.parametrize(
    "x_dtype,cos_dtype,tol",
    [
        (torch.float32, torch.float32, 1e-6),
        (torch.bfloat16, torch.float32, 1e-2),
        (torch.bfloat16, torch.bfloat16, 2e-2),
    ],
    ids=["fp32", "bf16-x-fp32-cos", "bf16"],
)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "view-of-fused-projection"])
def test_kernel_matches_float64(x_dtype, cos_dtype, tol, strided):
    g = torch.Generator().manual_seed(0)
    b, n, h, d = 2, 9, 3, 16
    if strided:
        fused = torch.randn(b, n, (h + 2) * d, generator=g).to(DEVICE, x_dtype)
        x = fused.requires_grad_()[..., d : (h + 1) * d].unflatten(-1, (h, d))
        leaf = fused
    else:
        x = torch.randn(b, n, h, d, generator=g).to(DEVICE, x_dtype).requires_grad_()
        leaf = x
    angles = torch.rand(1, n, d, generator=g) * 20
    cos, sin = (f(angles).to(DEVICE, cos_dtype).expand(b, n, d) for f in (torch.cos, torch.sin))
    y = apply_rotary(x, cos, sin, backend="triton")
    assert y.dtype == rotary_reference(x, cos, sin).dtype == torch.promote_types(x_dtype, cos_dtype)
    dy = torch.randn(y.shape, generator=g).to(DEVICE, y.dtype)
    (grad,) = torch.autograd.grad(y, leaf, dy)
    x64 = x.detach().double().requires_grad_()
    y64 = _float64_rotary(x64, cos, sin)
    (grad64,) = torch.autograd.grad(y64, x64, dy.double())
    torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol)
    got = grad[..., d : (h + 1) * d].unflatten(-1, (h, d)) if strided else grad
    torch.testing.assert_close(got.double(), grad64, rtol=tol, atol=tol)
    if strided:  # the other columns of the fused projection get no gradient
        assert torch.equal(grad[..., :d], torch.zeros_like(grad[..., :d]))


def test_shapes_are_checked():
    x = torch.randn(1, 4, 2, 6, device=DEVICE)
    with pytest.raises(ValueError, match="rotary"):
        apply_rotary(x, torch.ones(1, 4, 8, device=DEVICE), torch.ones(1, 4, 8, device=DEVICE))
    with pytest.raises(ValueError, match="power of two"):
        apply_rotary(
            x, torch.ones(1, 4, 6, device=DEVICE), torch.ones(1, 4, 6, device=DEVICE), backend="triton"
        )


def test_out_dtype_is_written_directly():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 6, 2, 8, generator=g).to(DEVICE, torch.bfloat16).requires_grad_()
    angles = torch.rand(1, 6, 8, generator=g).to(DEVICE) * 9
    cos, sin = angles.cos(), angles.sin()
    y = apply_rotary(x, cos, sin, out_dtype=torch.bfloat16, backend="triton")
    assert y.dtype == torch.bfloat16 and rotary_reference(x, cos, sin).dtype == torch.float32
    dy = torch.randn(y.shape, generator=g).to(DEVICE, torch.bfloat16)
    (got,) = torch.autograd.grad(y, x, dy)
    assert got.dtype == torch.bfloat16
    # float64 oracle (the bf16 autograd of the PyTorch formula rounds its two gradient terms separately,
    # which can cancel: it is no reference at this precision)
    x64 = x.detach().double().requires_grad_()
    y64 = _float64_rotary(x64, cos, sin)
    (want,) = torch.autograd.grad(y64, x64, dy.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)


def test_compiles_fullgraph():
    x = torch.randn(1, 5, 2, 8, device=DEVICE, requires_grad=True)
    angles = torch.rand(1, 5, 8, device=DEVICE)
    cos, sin = angles.cos(), angles.sin()

    def f(t):
        return apply_rotary(t, cos, sin, backend="triton").square().sum()

    (got,) = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(x), x)
    (want,) = torch.autograd.grad(rotary_reference(x, cos, sin).square().sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
