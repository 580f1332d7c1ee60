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


# (B, N, S, Hkv, D, slots, rotate, dtype)
WRITE_CASES = [
    (2, 1, 12, 2, 64, [7], True, torch.float32),
    (2, 3, 9, 3, 32, [8, 0, 1], True, torch.float32),  # ring slots that wrap, Hkv not a power of two
    (1, 2, 6, 1, 128, [2, 3], False, torch.float32),
    (2, 2, 10, 2, 64, [4, 5], True, torch.bfloat16),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", WRITE_CASES, ids=lambda c: f"B{c[0]}-N{c[1]}-D{c[4]}-{c[7]}-rot{c[6]}")
def test_write_kv_cache_matches_float64_rotary_and_copy(case, backend) -> None:
    """k rotated (RoPE written out in float64) into its slots, v copied; every other slot untouched."""
    from l2a.ops.kvcache import write_kv_cache

    b, n, s, h, d, slots, rotate, dtype = case
    g = torch.Generator().manual_seed(3)
    k, v = (torch.randn(b, n, h, d, generator=g, dtype=torch.float64) for _ in range(2))
    angles = torch.rand(1, n, d // 2, generator=g, dtype=torch.float64) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    caches = [torch.randn(b, s, h, d, generator=g, dtype=torch.float64) for _ in range(2)]
    to = dict(device=DEVICE, dtype=dtype)
    k_cache, v_cache = (c.to(**to) for c in caches)
    before = [c.clone() for c in (k_cache, v_cache)]
    idx = torch.tensor(slots, device=DEVICE)
    rope = (cos.to(**to), sin.to(**to)) if rotate else (None, None)
    with torch.no_grad():
        write_kv_cache(k_cache, v_cache, idx, k.to(**to), v.to(**to), *rope, backend=backend)
    kq, vq = k.to(dtype).double(), v.to(dtype).double()
    if rotate:
        c, s_ = cos.to(dtype).double()[:, :, None], sin.to(dtype).double()[:, :, None]
        k1, k2 = kq[..., : d // 2], kq[..., d // 2 :]
        kq = kq * c + torch.cat([-k2, k1], -1) * s_
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(k_cache[:, slots].double().cpu(), kq, **tol)
    torch.testing.assert_close(v_cache[:, slots].double().cpu(), vq, rtol=0, atol=0)
    others = [j for j in range(s) if j not in slots]
    for got, old in zip((k_cache, v_cache), before, strict=True):
        assert torch.equal(got[:, others], old[:, others])


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(k=torch.zeros(2, 1, 2, 8)), "k, v must be"),
        (dict(k_cache=torch.zeros(2, 9, 3, 16)), "k, v must be"),
        (dict(slots=torch.zeros(1, dtype=torch.int32)), "slots must be int64"),
        (dict(cos=torch.zeros(1, 1, 16), sin=None), "cos and sin"),
    ],
)
def test_write_kv_cache_bad_inputs_name_the_problem(change, message) -> None:
    from l2a.ops.kvcache import write_kv_cache

    args = dict(
        k_cache=torch.zeros(2, 9, 2, 16), v_cache=torch.zeros(2, 9, 2, 16),
        slots=torch.zeros(1, dtype=torch.int64), k=torch.zeros(2, 1, 2, 16), v=torch.zeros(2, 1, 2, 16),
        cos=None, sin=None,
    )  # fmt: skip
    args.update(change)
    with pytest.raises(ValueError, match=message):
        write_kv_cache(**args)


# (B, N, S, Hkv, D, slots, rotate, bias, dtype)
PROJECT_CASES = [
    (2, 1, 12, 2, 64, [7], True, True, torch.float32),
    (1, 3, 9, 3, 32, [8, 0, 1], True, False, torch.float32),  # ring slots that wrap, Hkv = 3
    (2, 2, 6, 1, 16, [2, 3], False, True, torch.float32),
    (2, 2, 10, 2, 128, [4, 5], True, True, torch.bfloat16),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case", PROJECT_CASES, ids=lambda c: f"B{c[0]}-N{c[1]}-Hkv{c[3]}-D{c[4]}-{c[8]}-rot{c[6]}-bias{c[7]}"
)
def test_project_kv_cache_matches_float64(case, backend) -> None:
    """Keys and values projected from x in float64, keys rotated (RoPE written out), into their slots;
    every other slot untouched."""
    from l2a.ops.kvcache import project_kv_cache

    b, n, s, h, d, slots, rotate, bias, dtype = case
    g = torch.Generator().manual_seed(4)
    hidden = 40
    x = torch.randn(b, n, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(2 * h * d, hidden, generator=g, dtype=torch.float64) / hidden**0.5
    bb = torch.randn(2 * h * d, generator=g, dtype=torch.float64) if bias else None
    angles = torch.rand(b, n, d // 2, generator=g, dtype=torch.float64) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    to = dict(device=DEVICE, dtype=dtype)
    k_cache, v_cache = (torch.randn(b, s, h, d, generator=g, dtype=torch.float64).to(**to) for _ in range(2))
    before = [c.clone() for c in (k_cache, v_cache)]
    rope = (cos.to(**to), sin.to(**to)) if rotate else (None, None)
    with torch.no_grad():
        project_kv_cache(
            k_cache, v_cache, torch.tensor(slots, device=DEVICE), x.to(**to), w.to(**to),
            None if bb is None else bb.to(**to), *rope, backend=backend,
        )  # fmt: skip
    xr, wr = x.to(dtype).double(), w.to(dtype).double()
    kv = (xr @ wr.T + (0 if bb is None else bb.to(dtype).double())).view(b, n, 2 * h, d)
    k, v = kv[:, :, :h], kv[:, :, h:]
    if rotate:
        c, s_ = cos.to(dtype).double()[:, :, None], sin.to(dtype).double()[:, :, None]
        k = k * c + torch.cat([-k[..., d // 2 :], k[..., : d // 2]], -1) * s_
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(k_cache[:, slots].double().cpu(), k, **tol)
    torch.testing.assert_close(v_cache[:, slots].double().cpu(), v, **tol)
    others = [j for j in range(s) if j not in slots]
    for got, old in zip((k_cache, v_cache), before, strict=True):
        assert torch.equal(got[:, others], old[:, others])


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(weight=torch.zeros(63, 8)), "weight"),
        (dict(x=torch.zeros(1, 1, 8)), "x must be"),
        (dict(bias=torch.zeros(5)), "bias must have"),
        (dict(slots=torch.zeros(2, dtype=torch.int64)), "slots must be"),
        (dict(cos=torch.zeros(1, 1, 16)), "cos and sin"),
        (dict(weight=torch.zeros(64, 8, dtype=torch.float64)), "one dtype"),
    ],
)
def test_project_kv_cache_bad_inputs_name_the_problem(change, message) -> None:
    from l2a.ops.kvcache import project_kv_cache

    args = dict(
        k_cache=torch.zeros(2, 9, 2, 16), v_cache=torch.zeros(2, 9, 2, 16),
        slots=torch.zeros(1, dtype=torch.int64), x=torch.zeros(2, 1, 8), weight=torch.zeros(64, 8),
    )  # fmt: skip
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        project_kv_cache(**args)
