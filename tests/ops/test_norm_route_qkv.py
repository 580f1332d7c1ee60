"""norm_route_qkv (a routed branch's decode-step entry: RMSNorm, router decision, k/v into the cache, routed
q): PyTorch and Triton (interpreter on CPU) against a float64 formula written out here."""

from __future__ import annotations

import os

import pytest
import torch

from l2a.ops.kvcache import norm_route_qkv

BACKENDS = ["torch"]
try:
    import triton  # noqa: F401

    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        BACKENDS.append("triton")
except ImportError:
    pass
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
HIDDEN, EPS, TEMPERATURE, THRESHOLD, OFFSET = 80, 1e-6, 2.0, 0.6, 0.3

# (B, N, Hq, Hkv, D, cache slots, bias, dtype, routing, cos/sin per batch row)
CASES = [
    (1, 1, 4, 2, 32, 12, True, torch.float32, "all", False),
    (3, 2, 6, 2, 16, 9, False, torch.float32, "mixed", True),
    (5, 1, 4, 1, 32, 7, True, torch.bfloat16, "mixed", True),
    (2, 1, 4, 2, 32, 6, True, torch.float32, "none", False),
    (2, 3, 2, 2, 16, 8, False, torch.float16, "all", False),
]


def _id(c):
    b, n, hq, hkv, d, s, bias, dtype, routing, per_row = c
    tail = ["bias"] if bias else []
    tail += ["cos-per-row"] if per_row else []
    return "-".join([f"B{b}", f"N{n}", f"Hq{hq}", f"Hkv{hkv}", f"D{d}", str(dtype)[6:], routing, *tail])


def _rotate(t, cos, sin):
    """RoPE in float64: t (B, N, H, D), cos/sin (B or 1, N, D)."""
    half = t.shape[-1] // 2
    c, s = cos[:, :, None], sin[:, :, None]
    return t * c + torch.cat([-t[..., half:], t[..., :half]], -1) * s


def _inputs(case, seed=0):
    b, n, hq, hkv, d, s, bias, dtype, routing, per_row = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, HIDDEN, generator=g, dtype=torch.float64)
    # feature 0 decides the route (sign pattern below), the rest of the router row nudges the logits
    sign = {"mixed": torch.tensor([1.0, -1.0]).repeat(b * n)[: b * n], "none": -torch.ones(b * n)}.get(
        routing, torch.ones(b * n)
    )
    x[..., 0] = 4.0 * sign.view(b, n).double()
    router = torch.randn(1, HIDDEN, generator=g, dtype=torch.float64) * 0.05
    router[0, 0] = 3.0
    p = dict(
        x=x,
        norm_weight=torch.rand(HIDDEN, generator=g, dtype=torch.float64) + 0.5,
        router_weight=router,
        q_weight=torch.randn(hq * d, HIDDEN, generator=g, dtype=torch.float64) / HIDDEN**0.5,
        q_bias=torch.randn(hq * d, generator=g, dtype=torch.float64) if bias else None,
        kv_weight=torch.randn(2 * hkv * d, HIDDEN, generator=g, dtype=torch.float64) / HIDDEN**0.5,
        kv_bias=torch.randn(2 * hkv * d, generator=g, dtype=torch.float64) if bias else None,
    )
    angles = torch.rand(b if per_row else 1, n, d // 2, generator=g, dtype=torch.float64) * 6
    p["cos"], p["sin"] = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    p = {k: None if v is None else v.to(dtype).double() for k, v in p.items()}  # the values the op sees
    caches = [torch.randn(b, s, hkv, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(2)]
    slots = torch.randperm(s, generator=g)[:n]
    return p, caches, slots


def _float64(p, hkv, d):
    x = p["x"]
    gn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * p["norm_weight"]
    soft = torch.sigmoid(((gn @ p["router_weight"].T)[..., 0] + OFFSET) / TEMPERATURE)
    q = gn @ p["q_weight"].T + (0 if p["q_bias"] is None else p["q_bias"])
    q = _rotate(q.unflatten(-1, (-1, d)), p["cos"], p["sin"])
    kv = (gn @ p["kv_weight"].T + (0 if p["kv_bias"] is None else p["kv_bias"])).unflatten(-1, (2 * hkv, d))
    return q, soft, _rotate(kv[:, :, :hkv], p["cos"], p["sin"]), kv[:, :, hkv:]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_norm_route_qkv_matches_float64(case, backend) -> None:
    """Decisions equal, soft, routed q (0 elsewhere) and the written keys / values within the dtype's
    tolerance; cache slots other than the new tokens' untouched."""
    b, n, hq, hkv, d, s, bias, dtype, routing, per_row = case
    p, (k_cache, v_cache), slots = _inputs(case)
    want_q, want_soft, want_k, want_v = _float64(p, hkv, d)
    want_hard = want_soft >= THRESHOLD
    assert ((want_soft - THRESHOLD).abs() > 0.02).all(), "decisions must not sit on the threshold"
    assert want_hard.any() == (routing != "none") and want_hard.all() == (routing == "all")
    to = dict(device=DEVICE, dtype=dtype)
    k_cache, v_cache = k_cache.to(DEVICE), v_cache.to(DEVICE)
    before = [c.clone() for c in (k_cache, v_cache)]
    args = {k: None if v is None else v.to(**to) for k, v in p.items()}
    q, soft, hard = norm_route_qkv(
        args["x"], args["norm_weight"], EPS, args["router_weight"], args["q_weight"], args["q_bias"],
        args["kv_weight"], args["kv_bias"], k_cache, v_cache, slots.to(DEVICE), args["cos"], args["sin"],
        temperature=TEMPERATURE, threshold=THRESHOLD, offset=OFFSET, backend=backend,
    )  # fmt: skip
    assert q.shape == (b, n, hq, d) and q.dtype == dtype
    assert soft.dtype == torch.float32 and hard.dtype == torch.bool
    assert torch.equal(hard.cpu(), want_hard)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=4e-2, rtol=3e-2)
    torch.testing.assert_close(
        soft.double().cpu(), want_soft, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=0
    )
    want_q = torch.where(want_hard[..., None, None], want_q, 0.0)
    torch.testing.assert_close(q.double().cpu(), want_q, **tol)
    torch.testing.assert_close(k_cache[:, slots].double().cpu(), want_k, **tol)
    torch.testing.assert_close(v_cache[:, slots].double().cpu(), want_v, **tol)
    others = [j for j in range(s) if j not in slots.tolist()]
    for got, old in zip((k_cache, v_cache), before, strict=True):
        assert torch.equal(got[:, others], old[:, others])


def _good_args():
    b, n, hkv, hq, d, k = 2, 1, 2, 4, 16, 8
    return dict(
        x=torch.zeros(b, n, k), norm_weight=torch.ones(k), eps=EPS, router_weight=torch.zeros(1, k),
        q_weight=torch.zeros(hq * d, k), q_bias=None, kv_weight=torch.zeros(2 * hkv * d, k), kv_bias=None,
        k_cache=torch.zeros(b, 5, hkv, d), v_cache=torch.zeros(b, 5, hkv, d),
        slots=torch.zeros(n, dtype=torch.int64), cos=torch.ones(1, n, d), sin=torch.zeros(1, n, d),
        temperature=1.0, threshold=0.5,
    )  # fmt: skip


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(router_weight=torch.zeros(2, 8)), "router_weight"),
        (dict(norm_weight=torch.zeros(7)), "norm_weight"),
        (dict(q_weight=torch.zeros(60, 8)), "q_weight"),
        (dict(q_bias=torch.zeros(64)), "both biases"),
        (dict(kv_weight=torch.zeros(63, 8)), "k/v weight"),
        (dict(router_weight=torch.zeros(1, 8, dtype=torch.float64)), "one dtype"),
        (dict(cos=None, sin=None), "cos and sin are required"),
        (dict(cos=torch.ones(3, 1, 16), sin=torch.zeros(3, 1, 16)), "B or 1"),
        (dict(temperature=0.0), "temperature > 0"),
        (dict(threshold=1.0), "threshold"),
        (dict(slots=torch.zeros(1, dtype=torch.int32)), "slots must be"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_norm_route_qkv_bad_inputs_name_the_problem(change, message) -> None:
    args = _good_args()
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        norm_route_qkv(**args)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton (CUDA or TRITON_INTERPRET=1)")
def test_norm_route_qkv_triton_refuses_gradients() -> None:
    args = _good_args()
    args["q_weight"] = args["q_weight"].requires_grad_()
    with pytest.raises(ValueError, match="no gradient"):
        norm_route_qkv(**args, backend="triton")
