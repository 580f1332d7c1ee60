"""attention_with_kvcache (preallocated cache, fill level on the device, optional ring buffer): PyTorch and
Triton (interpreter on CPU) against the float64 reference on the same keys laid out in order."""

from __future__ import annotations

import os

import pytest
import torch

from l2a.ops import attention_with_kvcache
from l2a.ops.reference import conditional_attention_reference, sliding_window_attention_reference

BACKENDS = ["torch"]
try:
    import triton  # noqa: F401

    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        BACKENDS.append("triton")
except ImportError:
    pass
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

# (B, N, filled, slots, Hq, Hkv, D, window, ring, routing)
CASES = [
    (2, 1, 70, 90, 4, 2, 64, None, False, "mixed"),
    (2, 3, 50, 64, 7, 1, 64, None, False, "head-wise"),
    (2, 1, 100, 40, 4, 1, 64, 33, True, None),
    (1, 4, 37, 40, 8, 2, 128, 37, True, None),
    (2, 2, 30, 40, 4, 4, 64, 20, True, None),  # ring not yet wrapped
    (2, 2, 60, 80, 4, 2, 64, 25, False, None),
]


def _id(c):
    b, n, filled, slots, hq, hkv, d, window, ring, routing = c
    parts = [f"B{b}", f"N{n}", f"len{filled}", f"S{slots}", f"Hq{hq}", f"Hkv{hkv}", f"D{d}"]
    parts += [f"W{window}"] if window else []
    return "-".join(parts + (["ring"] if ring else []) + ([routing] if routing else []))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_kvcache_attention_equals_reference_on_ordered_keys(case, backend):
    b, n, filled, slots, hq, hkv, d, window, ring, routing = case
    gen = torch.Generator().manual_seed(filled + n)
    q = torch.randn(b, n, hq, d, generator=gen)
    keys = torch.randn(b, filled, hkv, d, generator=gen)
    values = torch.randn(b, filled, hkv, d, generator=gen)
    k_cache = torch.full((b, slots, hkv, d), float("nan"))  # unwritten slots must never be read
    v_cache = torch.full((b, slots, hkv, d), float("nan"))
    positions = torch.arange(filled)
    if ring:
        positions = positions[-slots:]
        k_cache[:, positions % slots] = keys[:, positions]
        v_cache[:, positions % slots] = values[:, positions]
    else:
        k_cache[:, :filled], v_cache[:, :filled] = keys, values
    key_start = torch.tensor([0, 7][:b])
    active = None
    if routing is not None:
        active = torch.rand((b, n, hq) if routing == "head-wise" else (b, n), generator=gen) < 0.6
        active.view(-1)[0] = True
    to = dict(device=DEVICE)
    out = attention_with_kvcache(
        q.to(**to),
        k_cache.to(**to),
        v_cache.to(**to),
        torch.tensor([filled], dtype=torch.int32, **to),
        active=None if active is None else active.to(**to),
        window=window,
        ring=ring,
        key_start=key_start.to(**to),
        backend=backend,
    )
    args = (q.double(), keys.double(), values.double())
    if window is None:
        ref, _ = conditional_attention_reference(*args, active, d**-0.5, 0, None, key_start)
    else:
        ref, _ = sliding_window_attention_reference(*args, window, d**-0.5, None, key_start)
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-5, rtol=2e-5)


def test_ring_too_small_for_the_window_is_refused():
    q, k = torch.randn(1, 2, 2, 8), torch.randn(1, 10, 2, 8)
    with pytest.raises(ValueError, match="ring cache of 10 slots"):
        attention_with_kvcache(q, k, k, torch.tensor([12]), window=10, ring=True)
