"""Fused SwiGLU kernel against the float64 formula: values and the gradient of the fused gate/up input."""

from __future__ import annotations

import os

import pytest
import torch

from l2a.ops.activation import swiglu, swiglu_reference

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 5, 2 * 1100), (3, 40)], ids=["3d-F1100", "2d-F20"])
def test_kernel_matches_float64(shape, dtype, tol):
    g = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(shape, generator=g) * 3).to(DEVICE, dtype).requires_grad_()
    y = swiglu(gate_up, backend="triton")
    assert y.dtype == dtype and y.shape == (*shape[:-1], shape[-1] // 2)
    dy = torch.randn(y.shape, generator=g).to(DEVICE, dtype)
    (grad,) = torch.autograd.grad(y, gate_up, dy)
    x64 = gate_up.detach().double().requires_grad_()
    gate, up = x64.chunk(2, -1)
    y64 = gate * torch.sigmoid(gate) * up
    (grad64,) = torch.autograd.grad(y64, x64, dy.double())
    torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double(), grad64, rtol=tol, atol=tol)
    torch.testing.assert_close(swiglu_reference(gate_up.detach().double()), y64)


def test_odd_width_is_an_error():
    with pytest.raises(ValueError, match="even"):
        swiglu(torch.randn(2, 7, device=DEVICE))


def test_compiles_fullgraph():
    gate_up = torch.randn(3, 2, 24, device=DEVICE, requires_grad=True)

    def f(t):
        return swiglu(t, backend="triton").square().sum()

    (got,) = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(gate_up), gate_up)
    (want,) = torch.autograd.grad(swiglu_reference(gate_up).square().sum(), gate_up)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
