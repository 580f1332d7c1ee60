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

from l2a.ops import all_or_here_attention, conditional_attention, sliding_window_attention
from l2a.ops.aha import merge_by_lse
from l2a.ops.reference import attention_mask

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import l2a.ops.triton.aha as aha_triton  # noqa: E402  (registers torch.ops.l2a.all_or_here_attention)
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


def _check(case: Case, seed: int, run=None) -> None:
    """Kernel (or `run`) against the float64 reference: out, lse, dq, dk, dv; no NaN left anywhere."""
    inp = _inputs(case, seed)
    got = (run or _run)(case, inp, case.dtype, "triton")
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


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_all_or_here_attention_matches_reference(case: Case) -> None:
    _check(case, seed=zlib.crc32(case.id.encode()))


# rows and keys spanning several of the GPU's 64-128 tiles, with partial tiles at both ends
GPU_TILE_CASES = [
    Case(150, 7, 1, window=40, active_frac=0.2),
    Case(140, 4, 2, window=20, dtype=torch.bfloat16, docs=(0, 61, 140)),
]


@pytest.mark.parametrize("loop", ["branch", "split"])
@pytest.mark.parametrize("case", GPU_TILE_CASES, ids=lambda c: c.id)
def test_gpu_launch_configs_match_reference(case: Case, loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU's tile sizes in the interpreter: tile-boundary logic that 16 x 16 tiles never reach."""
    monkeypatch.setenv("L2A_DKDV_LOOP", loop)
    monkeypatch.setattr(_flash, "fwd_config", _flash.gpu_fwd_config)
    monkeypatch.setattr(_flash, "aha_local_fwd_config", _flash.gpu_aha_local_fwd_config)
    monkeypatch.setattr(_flash, "bwd_dq_config", _flash.gpu_bwd_dq_config)
    monkeypatch.setattr(_flash, "bwd_dkdv_config", _flash.gpu_bwd_dkdv_config)
    _check(case, seed=zlib.crc32(case.id.encode()) + 2)


@pytest.mark.parametrize(
    ("launch", "routed_tiles"),
    [("split", 1), ("split", 3), ("packed", 1)],
    ids=["split1", "split3", "packed"],
)
@pytest.mark.parametrize("case", [CASES[2], CASES[5], CASES[6]], ids=lambda c: c.id)
def test_forward_launches_match_reference(
    case: Case, launch: str, routed_tiles: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both forward launches (split: routed programs taking one or several tiles; packed)."""
    assert launch in aha_triton.FWD_LAUNCHES
    monkeypatch.setenv("L2A_AHA_FWD_LAUNCH", launch)
    monkeypatch.setenv("L2A_AHA_ROUTED_TILES", str(routed_tiles))
    _check(case, seed=zlib.crc32(case.id.encode()) + 3)


def test_window_launch_with_the_gpu_config_and_its_register_cap_matches_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The split forward's window launch at its GPU config (64 x 32 tiles, one masked loop, register cap;
    the interpreter ignores the cap, the tile logic is what is checked), with a cap given by environment."""
    monkeypatch.setenv("L2A_AHA_FWD_LAUNCH", "split")
    assert _flash.gpu_aha_local_fwd_config(64) == _flash.Config(64, 32, 4, 3, max_regs=168)
    monkeypatch.setenv("L2A_AHA_FWD_LOCAL", "64,32,4,2,128")
    assert _flash.gpu_aha_local_fwd_config(64) == _flash.Config(64, 32, 4, 2, max_regs=128)
    assert _flash.gpu_aha_local_fwd_config(64).launch_options() == dict(
        num_warps=4, num_stages=2, maxnreg=128
    )
    monkeypatch.setattr(_flash, "aha_local_fwd_config", _flash.gpu_aha_local_fwd_config)
    case = GPU_TILE_CASES[0]
    _check(case, seed=zlib.crc32(case.id.encode()) + 4)


def test_bad_launch_config_from_environment_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("L2A_AHA_FWD_LOCAL", "64,32,4")
    with pytest.raises(ValueError, match=r"L2A_AHA_FWD_LOCAL must be BM,BN,warps,stages\[,max_regs\]"):
        _flash.gpu_aha_local_fwd_config(128)


def test_unknown_forward_launch_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("L2A_AHA_FWD_LAUNCH", "three")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="L2A_AHA_FWD_LAUNCH must be one of"):
        all_or_here_attention(q, k, v, torch.ones(1, 20, 4, dtype=torch.bool), 4, backend="triton")


def _run_composed(case: Case, inp: dict, dtype: torch.dtype, backend: str) -> tuple[torch.Tensor, ...]:
    """The two-op form: window attention for all pairs + far part for routed pairs, merged by lse."""
    q, k, v = (inp[name].to(DEVICE, dtype).requires_grad_() for name in ("q", "k", "v"))
    active = inp["active"].to(DEVICE)
    kw = dict(return_lse=True, backend=backend, **inp["kwargs"])
    near = sliding_window_attention(q, k, v, case.window, **kw)
    far = conditional_attention(q, k, v, active, key_offset=case.window, **kw)
    return _loss_and_grads(*merge_by_lse(*near, *far), q, k, v, inp, dtype)


def test_lse_merge_of_window_and_far_part_matches_reference() -> None:
    case = Case(30, 4, 1, b=2, window=5, dtype=torch.bfloat16, key_start=(3, 17))
    _check(case, seed=5, run=_run_composed)


def _qkv(n: int = 20, hq: int = 4, hkv: int = 2, d: int = 32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, n, hq, d, generator=g).to(DEVICE).requires_grad_()
    k = torch.randn(1, n, hkv, d, generator=g).to(DEVICE).requires_grad_()
    v = torch.randn(1, n, hkv, d, generator=g).to(DEVICE).requires_grad_()
    return q, k, v


def test_op_passes_opcheck() -> None:
    q, k, v = _qkv()
    active = torch.rand(1, 20, 4, generator=torch.Generator().manual_seed(1)).to(DEVICE) < 0.3
    args = (q, k, v, active, 4, 0.2, None, torch.tensor([2], device=DEVICE))
    torch.library.opcheck(torch.ops.l2a.all_or_here_attention.default, args)


def test_compiles_fullgraph_without_graph_break() -> None:
    q, k, v = _qkv()
    active = torch.arange(20 * 4, device=DEVICE).reshape(1, 20, 4) % 3 == 0

    def f(q, k, v):
        out, lse = all_or_here_attention(q, k, v, active, 4, return_lse=True, backend="triton")
        return out.sum() + lse.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    expected = torch.autograd.grad(f(q, k, v), (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", reason="needs CUDA"
)
def test_no_host_synchronisation() -> None:
    """Row lists, bounds and launches stay on the device: forward and backward never sync with the host."""
    q, k, v = (
        torch.randn(1, 300, h, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (8, 2, 2)
    )
    active = torch.rand(1, 300, 8, device="cuda") > 0.9
    all_or_here_attention(q, k, v, active, 32, backend="triton").sum().backward()  # compile outside
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = all_or_here_attention(q, k, v, active, 32, backend="triton")
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")


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


@pytest.mark.parametrize("chunk", [16, 1024], ids=lambda c: f"chunk{c}")
def test_pair_lists_hold_every_pair_once_in_order(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The list builder (several chunks, documents, key_start) against lists built pair by pair."""
    monkeypatch.setattr(aha_triton, "_CHUNK", chunk)
    b, n, nk, hq, hkv, window = 2, 23, 30, 6, 2, 5
    group = hq // hkv
    q, k = torch.zeros(b, n, hq, 16, device=DEVICE), torch.zeros(b, nk, hkv, 16, device=DEVICE)
    active = torch.rand(b, n, hq, generator=torch.Generator().manual_seed(2)).to(DEVICE) < 0.3
    key_start = torch.tensor([0, 9], device=DEVICE)
    rows = aha_triton.aha_rows(q, k, active, window, None, key_start)
    assert rows.pairs and rows.idx.shape == (b, 2 * hkv, n * group)
    for bi in range(b):
        for h in range(hkv):
            for part, want_routed in enumerate((True, False)):
                pairs = [
                    t * group + g
                    for t in range(n)
                    for g in range(group)
                    if bool(active[bi, t, h * group + g]) == want_routed
                ]
                lid = 2 * h + part
                count = len(pairs)
                assert int(rows.count[bi, lid]) == count
                assert rows.idx[bi, lid, :count].tolist() == pairs
                pos = [p // group + nk - n for p in pairs]
                lo = [max(int(key_start[bi]), 0 if want_routed else x - window + 1) for x in pos]
                assert rows.lo[bi, lid, :count].tolist() == lo
                assert rows.hi[bi, lid, :count].tolist() == pos
                assert (rows.lo[bi, lid, count:] == _flash._PAD).all()
                assert (rows.hi[bi, lid, count:] == _flash._PAD).all()
