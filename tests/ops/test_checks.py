"""Input checks of the ops: `cu_seqlens` must start at 0, end at N and never decrease (else the Triton kernels
and the PyTorch reference would silently disagree about the documents)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from l2a.ops import _checks, all_or_here_attention, conditional_attention, sliding_window_attention

BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") is not None else [])

BAD = {
    "start-not-0": ([2, 6, 10], "cu_seqlens must start at 0, got 2"),
    "end-short": ([0, 6, 8], "cu_seqlens must end at seqlen 10, got 8"),
    "end-long": ([0, 6, 12], "cu_seqlens must end at seqlen 10, got 12"),
    "decreasing": ([0, 7, 4, 10], r"non-decreasing .* cu_seqlens\[2\]=4 < cu_seqlens\[1\]=7"),
}


def _call(op: str, cu: torch.Tensor, backend: str) -> torch.Tensor:
    torch.manual_seed(0)
    q = torch.randn(1, 10, 2, 32)
    active = torch.ones(1, 10, 2, dtype=torch.bool)
    if op == "conditional":
        return conditional_attention(q, q, q, active, cu_seqlens=cu, backend=backend)
    if op == "all_or_here":
        return all_or_here_attention(q, q, q, active, 4, cu_seqlens=cu, backend=backend)
    return sliding_window_attention(q, q, q, 4, cu_seqlens=cu, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["conditional", "sliding_window", "all_or_here"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_cu_seqlens_are_refused(case, op, backend):
    values, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        _call(op, torch.tensor(values, dtype=torch.int32), backend)


@pytest.mark.parametrize("values", [[0, 10], [0, 4, 4, 10]], ids=["one-doc", "empty-doc"])
def test_valid_cu_seqlens_pass(values):
    out = _call("conditional", torch.tensor(values, dtype=torch.int32), "torch")
    assert out.shape == (1, 10, 2, 32) and torch.isfinite(out).all()


def test_an_in_place_change_after_a_valid_call_is_seen():
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    _call("conditional", cu, "torch")
    _call("sliding_window", cu, "torch")  # the same tensor again: read from the cache of the last check
    cu[1] = 12
    with pytest.raises(ValueError, match="non-decreasing"):
        _call("conditional", cu, "torch")


def test_values_read_once_per_tensor(monkeypatch):
    """A model passes one cu_seqlens to the ops of all its layers: the values (a host sync on CUDA) are read
    at the first call only."""
    reads = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or original(self))
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    for _ in range(3):
        _checks.check_cu_seqlens(cu, 1, 10, 10, cu.device)
    assert len(reads) == 1
    _checks.check_cu_seqlens(cu.clone(), 1, 10, 10, cu.device)  # another tensor: read again
    assert len(reads) == 2


def test_inference_mode_tensors_are_checked():
    with torch.inference_mode():
        cu = torch.tensor([0, 11], dtype=torch.int32)
        with pytest.raises(ValueError, match="must end at seqlen 10"):
            _checks.check_cu_seqlens(cu, 1, 10, 10, cu.device)
