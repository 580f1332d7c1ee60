"""The routed backward sizes its compact buffers by the longest routed list, not by N, and stays exact."""

from __future__ import annotations

import pytest
import torch

from l2a.ops import conditional_attention
from l2a.ops.reference import conditional_attention_reference
from l2a.ops.triton import _flash, _flash_bwd

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or _flash.interpreting()), reason="needs CUDA or TRITON_INTERPRET=1"
)


@pytest.mark.parametrize("head_wise", [False, True], ids=["token-wise", "head-wise"])
def test_compact_buffers_hold_the_routed_rows_only(head_wise, monkeypatch):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    n, hq, hkv, d = 70, 4, 2, 32
    q, k, v = (torch.randn(2, n, h, d, generator=g).to(device).requires_grad_() for h in (hq, hkv, hkv))
    shape = (2, n, hq) if head_wise else (2, n)
    active = (torch.rand(shape, generator=g) < 0.2).to(device)
    sizes = []
    original = _flash_bwd._compact_buffers
    monkeypatch.setattr(_flash_bwd, "_compact_buffers", lambda *a: sizes.append(a[-1]) or original(*a))
    out = conditional_attention(q, k, v, active, backend="triton")
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    lists = active if active.dim() == 2 else active.permute(0, 2, 1)
    assert sizes == [int(lists.sum(-1).max())] and sizes[0] < n
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = conditional_attention_reference(*leaves, active, d**-0.5, 0, None, None)
    for got, want in zip(grads, torch.autograd.grad(ref.square().sum(), leaves), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
