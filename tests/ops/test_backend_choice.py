"""backend="auto" picks Triton only for CUDA tensors the kernels support; the rest runs the PyTorch ops."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from l2a.ops import attention


def _cuda_like(d: int, dtype: torch.dtype) -> SimpleNamespace:
    """Stands in for a CUDA tensor (only device, shape and dtype are read), so this runs on CPU."""
    return SimpleNamespace(device=torch.device("cuda", 0), shape=(1, 8, 4, d), dtype=dtype)


@pytest.fixture
def triton_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "_triton_available", lambda: True)


def test_auto_on_cpu_uses_torch_silently() -> None:
    q = torch.zeros(1, 8, 4, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not attention._use_triton("auto", q)


@pytest.mark.parametrize("d, dtype", [(32, torch.bfloat16), (64, torch.float16), (128, torch.float32)])
def test_auto_takes_triton_for_supported_cuda_inputs(triton_present, d: int, dtype: torch.dtype) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert attention._use_triton("auto", _cuda_like(d, dtype))


@pytest.mark.parametrize(
    "d, dtype, named", [(16, torch.bfloat16, "head_dim 16"), (64, torch.float64, "float64")]
)
def test_auto_falls_back_with_a_warning(triton_present, d: int, dtype: torch.dtype, named: str) -> None:
    with pytest.warns(UserWarning, match=named):
        assert not attention._use_triton("auto", _cuda_like(d, dtype))


def test_explicit_backends(triton_present) -> None:
    # "triton" is taken as asked; the kernel's own check then names the problem
    assert attention._use_triton("triton", _cuda_like(16, torch.bfloat16))
    assert not attention._use_triton("torch", _cuda_like(64, torch.bfloat16))
    with pytest.raises(ValueError, match="backend"):
        attention._use_triton("cuda", _cuda_like(64, torch.bfloat16))
