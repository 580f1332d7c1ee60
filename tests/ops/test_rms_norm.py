"""Fused RMSNorm kernel against the float64 formula: values and gradients (input and weight), dtype rules
of the PyTorch RMSNorm (output in the promoted dtype of input and weight), and argument errors."""

from __future__ import annotations

import os

import pytest
import torch

from l2a.ops.norm import rms_norm, rms_norm_reference

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _float64_norm(x, weight, eps):
    x = x.double()
    return weight.double() * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize(
    "x_dtype,w_dtype,tol",
    [
        (torch.float32, torch.float32, 1e-5),
        (torch.bfloat16, torch.float32, 2e-2),
        (torch.bfloat16, torch.bfloat16, 2e-2),
    ],
    ids=["fp32", "bf16-input-fp32-weight", "bf16"],
)
@pytest.mark.parametrize("shape", [(3, 70, 48), (130, 64)], ids=["3d-H48", "2d-130rows"])
def test_kernel_matches_float64(shape, x_dtype, w_dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(DEVICE, x_dtype).requires_grad_()
    weight = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(DEVICE, w_dtype).requires_grad_()
    dy = torch.randn(shape, generator=g).to(DEVICE)
    y = rms_norm(x, weight, 1e-6, backend="triton")
    assert y.dtype == rms_norm_reference(x, weight, 1e-6).dtype == torch.promote_types(x_dtype, w_dtype)
    dx, dw = torch.autograd.grad(y, (x, weight), dy.to(y.dtype))
    assert dx.dtype == x_dtype and dw.dtype == w_dtype
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    y64 = _float64_norm(x64, w64, 1e-6)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol)
    torch.testing.assert_close(dx.double(), dx64, rtol=tol, atol=tol)
    # dweight sums over all rows: scale the tolerance by the magnitude of the sum
    torch.testing.assert_close(dw.double(), dw64, rtol=tol, atol=tol * dw64.abs().max().item())


def test_weight_shape_is_checked():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        rms_norm(x, torch.ones(4, device=DEVICE), 1e-6)


def test_compiles_fullgraph():
    x = torch.randn(4, 40, device=DEVICE, requires_grad=True)
    weight = torch.randn(40, device=DEVICE, requires_grad=True)
    f = torch.compile(
        lambda a, w: rms_norm(a, w, 1e-5, backend="triton").square().sum(),
        fullgraph=True,
        backend="aot_eager",
    )
    got = torch.autograd.grad(f(x, weight), (x, weight))
    want = torch.autograd.grad(rms_norm_reference(x, weight, 1e-5).square().sum(), (x, weight))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_out_dtype_is_written_directly():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(33, 64, generator=g).to(DEVICE).requires_grad_()
    weight = torch.randn(64, generator=g).to(DEVICE).requires_grad_()
    y = rms_norm(x, weight, 1e-6, out_dtype=torch.bfloat16, backend="triton")
    assert y.dtype == torch.bfloat16
    ref = rms_norm_reference(x, weight, 1e-6)
    torch.testing.assert_close(y, ref.to(torch.bfloat16))
    dy = torch.randn(y.shape, generator=g).to(DEVICE, torch.bfloat16)
    got = torch.autograd.grad(y, (x, weight), dy)
    want = torch.autograd.grad(ref, (x, weight), dy.float())
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "dtype,n_proj,tol",
    [
        (torch.float32, 1, 1e-5),
        (torch.float32, 7, 1e-5),
        (torch.bfloat16, 1, 2e-2),
        (torch.bfloat16, 4, 2e-2),
    ],
    ids=["fp32-R1", "fp32-R7", "bf16-R1", "bf16-R4"],
)
def test_norm_and_logits_kernel_matches_float64(dtype, n_proj, tol):
    """The norm and a router's logits on the normalised rows from one kernel, against float64."""
    from l2a.ops.norm import rms_norm_and_logits

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 3, 80, generator=g) * 3).to(DEVICE, dtype)
    weight = (1 + 0.3 * torch.randn(80, generator=g)).to(DEVICE, dtype)
    proj = (torch.randn(n_proj, 80, generator=g) / 9).to(DEVICE, dtype)
    with torch.no_grad():
        y, logits = rms_norm_and_logits(x, weight, 1e-6, proj, backend="triton")
    want = _float64_norm(x, weight, 1e-6)
    torch.testing.assert_close(y.double(), want, atol=tol, rtol=tol)
    assert logits.dtype == torch.float32 and logits.shape == (2, 3, n_proj)
    torch.testing.assert_close(logits.double(), want @ proj.double().T, atol=tol * 2, rtol=tol * 2)


def test_norm_and_logits_bad_inputs_name_the_problem():
    from l2a.ops.norm import rms_norm_and_logits

    x, w = torch.zeros(2, 8), torch.ones(8)
    with pytest.raises(ValueError, match="proj"):
        rms_norm_and_logits(x, w, 1e-6, torch.zeros(1, 7))
    with pytest.raises(TypeError, match="proj must be"):
        rms_norm_and_logits(x, w, 1e-6, torch.zeros(1, 8, dtype=torch.float64))
