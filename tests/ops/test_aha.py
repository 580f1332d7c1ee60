"""`l2a.ops.all_or_here_attention` (Triton, run by the interpreter on CPU) against the float64 reference.

Rule of flash-attn as in test_triton_attention.py: error against float64 at most 2x (forward) / 3x
(backward) that of plain PyTorch attention run in the same low precision, plus a small slack.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass

import pytest
import torch

from l2a.ops import all_or_here_attention
from l2a.ops.reference import attention_mask

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from l2a.ops.triton import _flash  # noqa: E402

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
SLACK = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 5e-4}


@pytest.fixture(autouse=True)
def poison_unwritten(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_flash, "POISON_UNWRITTEN", True)


@dataclass(frozen=True)
class Case:
    n: int
    hq: int
    hkv: int
    window: int
    active_frac: float = 0.3  # fraction of (token, head) pairs on full attention
    d: int = 64
    dtype: torch.dtype = torch.float32
    b: int = 1
    nk: int | None = None
    docs: tuple[int, ...] | None = None
    key_start: tuple[int, ...] | None = None
    tokenwise: bool = False

    @property
    def id(self) -> str:
        parts = [f"B{self.b}", f"N{self.n}"]
        if self.nk is not None:
            parts.append(f"Nk{self.nk}")
        parts += [f"Hq{self.hq}", f"Hkv{self.hkv}", f"D{self.d}", f"W{self.window}", f"a{self.active_frac}"]
        parts.append(DTYPE_IDS[self.dtype])
        if self.tokenwise:
            parts.append("tokenwise")
        if self.docs:
            parts.append("docs" + "_".join(map(str, self.docs)))
        if self.key_start:
            parts.append("ks" + "_".join(map(str, self.key_start)))
        return "-".join(parts)


CASES = [
    Case(53, 4, 1, window=8),
    Case(47, 4, 4, window=5, active_frac=0.5),
    Case(61, 4, 1, window=16, active_frac=1.0),
    Case(45, 4, 1, window=7, active_frac=0.0),
    Case(39, 4, 1, window=6, d=128, dtype=torch.bfloat16),
    Case(50, 8, 2, window=9, active_frac=0.2, dtype=torch.bfloat16),
    Case(47, 4, 2, window=6, docs=(0, 13, 30, 47)),
    Case(30, 4, 1, b=2, window=5, key_start=(3, 17)),
    Case(7, 4, 1, nk=43, window=9, active_frac=0.5),
    Case(1, 4, 4, nk=37, window=8, active_frac=0.5, dtype=torch.bfloat16),
    Case(33, 4, 1, window=40),
    Case(35, 4, 2, window=6, tokenwise=True, dtype=torch.float16),
]


def _inputs(case: Case, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    nk = case.nk or case.n
    q = torch.randn(case.b, case.n, case.hq, case.d, generator=g)
    k = torch.randn(case.b, nk, case.hkv, case.d, generator=g)
    v = torch.randn(case.b, nk, case.hkv, case.d, generator=g)
    shape = (case.b, case.n) if case.tokenwise else (case.b, case.n, case.hq)
    active = torch.rand(shape, generator=g) < case.active_frac
    dout = torch.randn(case.b, case.n, case.hq, case.d, generator=g)
    dlse = torch.randn(case.b, case.hq, case.n, generator=g)
    kwargs = {}
    if case.docs is not None:
        kwargs["cu_seqlens"] = torch.tensor(case.docs, dtype=torch.int32, device=DEVICE)
    if case.key_start is not None:
        kwargs["key_start"] = torch.tensor(case.key_start, dtype=torch.int64, device=DEVICE)
    return dict(q=q, k=k, v=v, active=active, dout=dout, dlse=dlse, kwargs=kwargs)


def _loss_and_grads(out, lse, q, k, v, inp: dict, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """out, lse, dq, dk, dv with loss = <out, dout> + <lse, dlse> (lse taken where finite)."""
    finite_lse = torch.where(torch.isfinite(lse), lse, 0.0)
    dout, dlse = inp["dout"].to(q.device, dtype), inp["dlse"].to(q.device)
    loss = (out.to(dtype) * dout).sum() + (finite_lse * dlse).sum()
    return (out.detach(), lse.detach(), *torch.autograd.grad(loss, (q, k, v)))


def _run(case: Case, inp: dict, dtype: torch.dtype, backend: str) -> tuple[torch.Tensor, ...]:
    q, k, v = (inp[name].to(DEVICE, dtype).requires_grad_() for name in ("q", "k", "v"))
    active = inp["active"].to(DEVICE)
    out, lse = all_or_here_attention(
        q, k, v, active, case.window, return_lse=True, backend=backend, **inp["kwargs"]
    )
    return _loss_and_grads(out, lse, q, k, v, inp, dtype)


def _low_precision_reference(case: Case, inp: dict, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Plain attention with every tensor op in `dtype`: the error scale the kernel is judged by."""
    q, k, v = (inp[name].to(dtype).requires_grad_() for name in ("q", "k", "v"))
    b, n, hq, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    extra = {name: inp["kwargs"].get(name) for name in ("cu_seqlens", "key_start")}
    extra = {name: t.cpu() if t is not None else None for name, t in extra.items()}
    full = attention_mask(b, n, nk, q.device, **extra)
    local = attention_mask(b, n, nk, q.device, window=case.window, **extra)
    act = inp["active"]
    act = (act[:, :, None] if act.dim() == 2 else act).expand(b, n, hq).permute(0, 2, 1)
    allowed = torch.where(act[..., None], full[:, None], local[:, None])
    kr, vr = k.repeat_interleave(hq // hkv, 2), v.repeat_interleave(hq // hkv, 2)
    scores = torch.einsum("bnhd,bmhd->bhnm", q, kr) / math.sqrt(d)
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores.float(), -1)
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    out = torch.einsum("bhnm,bmhd->bnhd", probs, vr)
    return _loss_and_grads(out, lse, q, k, v, inp, dtype)


def _max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double().cpu() - ref.double().cpu()).abs().max().item()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_all_or_here_attention_matches_reference(case: Case) -> None:
    inp = _inputs(case, seed=zlib.crc32(case.id.encode()))
    got = _run(case, inp, case.dtype, "triton")
    for t in got:
        assert not torch.isnan(t).any(), "kernel left NaN (unwritten or poisoned) entries"
    exact_inp = {**inp, **{name: inp[name].to(case.dtype).double() for name in ("q", "k", "v")}}
    ref = _run(case, exact_inp, torch.float64, "torch")
    low = _low_precision_reference(case, inp, case.dtype)
    lse, ref_lse = got[1].cpu(), ref[1].cpu()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows without keys must have lse = -inf"
    fin = torch.isfinite(ref_lse)
    lse_err = _max_err(lse[fin], ref_lse[fin]) if fin.any() else 0.0
    assert lse_err <= (1e-4 if case.dtype == torch.float32 else 2e-3), f"lse error {lse_err}"
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        if name == "lse":
            continue
        factor = 2.0 if name == "out" else 3.0
        err, base = _max_err(got[i], ref[i]), _max_err(low[i], ref[i])
        bound = factor * base + SLACK[case.dtype]
        assert err <= bound, f"{name}: error {err:.3g} > {factor} x {base:.3g} + slack"
    assert got[0].dtype == case.dtype


def test_reference_is_window_attention_where_inactive_and_causal_where_active() -> None:
    """The reference against brute force per (token, head): a softmax over the listed keys only."""
    g = torch.Generator().manual_seed(1)
    b, n, nk, hq, hkv, d, window = 1, 6, 9, 2, 1, 8, 3
    q = torch.randn(b, n, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, nk, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, nk, hkv, d, generator=g, dtype=torch.float64)
    active = torch.rand(b, n, hq, generator=g) < 0.5
    out = all_or_here_attention(q, k, v, active, window, backend="torch")
    for t in range(n):
        pos = t + nk - n
        for h in range(hq):
            keys = range(0, pos + 1) if active[0, t, h] else range(pos - window + 1, pos + 1)
            keys = torch.tensor(list(keys))
            w = torch.softmax(k[0, keys, 0] @ q[0, t, h] / math.sqrt(d), 0)
            torch.testing.assert_close(out[0, t, h], w @ v[0, keys, 0])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(window=0), ValueError, "window must be >= 1"),
        (dict(active=torch.ones(1, 10, 3, dtype=torch.bool)), ValueError, "active must have shape"),
        (dict(active=torch.ones(1, 10, 4)), TypeError, "active must have dtype torch.bool"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
    ],
    ids=["window0", "active-heads", "active-dtype", "backend"],
)
def test_bad_arguments_are_clear_errors(kwargs: dict, error: type, match: str) -> None:
    q, k, v = torch.randn(1, 10, 4, 32), torch.randn(1, 10, 2, 32), torch.randn(1, 10, 2, 32)
    args = dict(active=torch.ones(1, 10, 4, dtype=torch.bool), window=4, backend="torch") | kwargs
    active, window = args.pop("active"), args.pop("window")
    with pytest.raises(error, match=match):
        all_or_here_attention(q, k, v, active, window, **args)
