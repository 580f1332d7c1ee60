"""Decode kernels (split keys, log-sum-exp merge) under the Triton interpreter against the float64 reference:
few query tokens, GQA, unrouted rows, head-wise routing, left padding (key_start), sliding windows."""

from __future__ import annotations

import os

import pytest
import torch

from l2a.ops import conditional_attention, sliding_window_attention
from l2a.ops.reference import (
    attention_mask,
    conditional_attention_reference,
    masked_attention,
    sliding_window_attention_reference,
)

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from l2a.ops.triton import decode  # noqa: E402
from l2a.ops.triton._flash import interpreting  # noqa: E402

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}

# (B, N, Nk, Hq, Hkv, D, routing, window, key_start, dtype)
CASES = [
    (1, 1, 150, 4, 4, 64, "mixed", None, None, torch.float32),
    (2, 1, 150, 8, 2, 64, "mixed", None, (0, 37), torch.float32),
    (2, 3, 130, 7, 1, 128, "mixed", None, (5, 60), torch.float32),
    (2, 4, 97, 4, 1, 64, "head-wise", None, (0, 11), torch.float32),
    (2, 2, 120, 8, 2, 128, "none", None, None, torch.float32),
    (1, 16, 140, 4, 4, 64, "mixed", None, None, torch.bfloat16),
    (2, 1, 150, 4, 1, 64, "window", 40, (0, 120), torch.float32),
    (2, 5, 130, 7, 1, 128, "window", 17, (3, 0), torch.bfloat16),
    (1, 2, 64, 8, 2, 64, "window", 100, None, torch.float32),
]


def _id(case) -> str:
    b, n, nk, hq, hkv, d, routing, window, key_start, dtype = case
    parts = [f"B{b}", f"N{n}", f"Nk{nk}", f"Hq{hq}", f"Hkv{hkv}", f"D{d}", routing]
    if window:
        parts.append(f"W{window}")
    if key_start:
        parts.append("ks" + "_".join(map(str, key_start)))
    return "-".join(parts + [str(dtype).removeprefix("torch.")])


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_decode_kernel_equals_float64_reference(case, poisoned_outputs, nan_buffers):
    b, n, nk, hq, hkv, d, routing, window, key_start, dtype = case
    gen = torch.Generator().manual_seed(nk * 31 + n)
    q = torch.randn(b, n, hq, d, generator=gen).to(DEVICE, dtype)
    # a strided cache view: keys live in a longer buffer, as in L2ACache
    k = torch.randn(b, nk + 9, hkv, d, generator=gen).to(DEVICE, dtype)[:, :nk]
    v = torch.randn(b, nk + 9, hkv, d, generator=gen).to(DEVICE, dtype)[:, :nk]
    ks = None if key_start is None else torch.tensor(key_start, device=DEVICE)
    scale = d**-0.5
    if routing == "window":
        out, lse = decode.decode_attention_fwd(q, k, v, None, scale, 0, window, ks)
        ref, ref_lse = sliding_window_attention_reference(
            q.double(), k.double(), v.double(), window, scale, None, ks
        )
    else:
        shape = (b, n, hq) if routing == "head-wise" else (b, n)
        active = torch.rand(shape, generator=gen) < 0.5
        if routing == "none":
            active[:] = False
        elif routing == "mixed":
            active.view(-1)[0], active.view(-1)[-1] = True, False
        active = active.to(DEVICE)
        out, lse = decode.decode_attention_fwd(q, k, v, active, scale, 0, 0, ks)
        ref, ref_lse = conditional_attention_reference(
            q.double(), k.double(), v.double(), active, scale, 0, None, ks
        )
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], **TOL[dtype])
    if routing == "none":
        assert torch.equal(out, torch.zeros_like(out))


def test_public_ops_use_the_decode_kernels_for_few_tokens(monkeypatch):
    monkeypatch.setattr(decode, "DECODE_MIN_KEYS", 64)
    calls = []
    real = decode.decode_attention_fwd
    monkeypatch.setattr(decode, "decode_attention_fwd", lambda *a: calls.append(a[0].shape) or real(*a))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1, 4, 64, generator=gen).to(DEVICE)
    k = torch.randn(2, 100, 2, 64, generator=gen).to(DEVICE)
    v = torch.randn(2, 100, 2, 64, generator=gen).to(DEVICE)
    active = torch.tensor([[True], [False]], device=DEVICE)
    out = conditional_attention(q, k, v, active, backend="triton")
    ref, _ = conditional_attention_reference(q.double(), k.double(), v.double(), active, 0.125)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    local = sliding_window_attention(q, k, v, 30, backend="triton")
    ref, _ = sliding_window_attention_reference(q.double(), k.double(), v.double(), 30, 0.125)
    torch.testing.assert_close(local.double(), ref, atol=2e-5, rtol=2e-5)
    assert len(calls) == 2
    # a gradient needs the training kernels: the decode kernels are forward only
    conditional_attention(q.requires_grad_(), k, v, active, backend="triton").sum().backward()
    assert len(calls) == 2 and q.grad is not None


def test_decode_kernel_with_key_offset_equals_reference():
    """key_offset (AHA's far part: keys j <= t - offset), head-wise routing, left padding."""
    gen = torch.Generator().manual_seed(5)
    b, n, nk, hq, hkv, d, offset = 2, 3, 120, 4, 2, 64, 40
    q = torch.randn(b, n, hq, d, generator=gen).to(DEVICE)
    k = torch.randn(b, nk, hkv, d, generator=gen).to(DEVICE)
    v = torch.randn(b, nk, hkv, d, generator=gen).to(DEVICE)
    active = (torch.rand(b, n, hq, generator=gen) < 0.6).to(DEVICE)
    ks = torch.tensor([0, 90], device=DEVICE)  # row 1: some queries see no far key at all
    out, lse = decode.decode_attention_fwd(q, k, v, active, d**-0.5, offset, 0, ks)
    ref, ref_lse = conditional_attention_reference(
        q.double(), k.double(), v.double(), active, d**-0.5, offset, None, ks
    )
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """The launcher's outputs (`empty_like`) start as NaN: a row that no program writes shows."""
    real = torch.empty_like

    def poisoned(t, *args, **kwargs):
        out = real(t, *args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty_like", poisoned)


@pytest.fixture
def nan_buffers(monkeypatch):
    """The launcher's `new_empty` buffers (partials, lse) start as NaN: reading an unwritten partial shows."""
    real = torch.Tensor.new_empty

    def poisoned(self, *args, **kwargs):
        t = real(self, *args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned)


# (B, N, Nk, Hq, Hkv, window, key_start, key_offset): the routed rows meet many more splits than one merge
# block holds (interpreter: 32 keys a split, 2 splits a block); the other rows are unrouted, read no partial
LONG_MERGES = [
    # splits 1..9: blocks from an odd split; the last block's second split (10) is written by no program
    (1, 1, 330, 4, 1, None, (45,), 40),
    (2, 3, 300, 8, 2, 260, (0, 20), 0),  # window starts mid split (32-key splits: 1..9 of 10; GPU: 0..4)
    (2, 2, 260, 4, 2, 200, (70, 0), 0),  # key_start or the window cuts the range, by batch row
]


def _long_id(case) -> str:
    b, n, nk, hq, hkv, window, key_start, key_offset = case
    parts = [f"B{b}", f"N{n}", f"Nk{nk}", f"Hq{hq}", f"Hkv{hkv}"] + ([f"W{window}"] if window else [])
    parts += [f"off{key_offset}"] if key_offset else []
    return "-".join(parts + ["ks" + "_".join(map(str, key_start))])


@pytest.mark.parametrize("case", LONG_MERGES, ids=[_long_id(c) for c in LONG_MERGES])
def test_merge_over_many_split_blocks_equals_float64_reference(
    case, nan_buffers, poisoned_outputs, monkeypatch
):
    b, n, nk, hq, hkv, window, key_start, key_offset = case
    if not interpreting():  # the GPU's splits are long: one key block each, two per merge block
        monkeypatch.setattr(decode, "split_size", lambda nk, programs, device, block_n: block_n)
        monkeypatch.setattr(decode, "merge_block", lambda n_splits, chunk, window: 2)
    d = 64
    gen = torch.Generator().manual_seed(nk + n)
    q = torch.randn(b, n, hq, d, generator=gen).to(DEVICE)
    k = torch.randn(b, nk, hkv, d, generator=gen).to(DEVICE)
    v = torch.randn(b, nk, hkv, d, generator=gen).to(DEVICE)
    active = torch.rand(b, n, hq, generator=gen) < 0.4
    active[..., 0], active[..., -1] = True, False
    ks = torch.tensor(key_start)
    cpu = torch.device("cpu")
    allowed = attention_mask(b, n, nk, cpu, key_offset=key_offset, window=window, key_start=ks)
    allowed = allowed.unsqueeze(1) & active.permute(0, 2, 1)[..., None]  # (B, Hq, N, Nk)
    # the case is what it claims: some row's keys span more than two merge blocks of splits
    chunk = decode.split_size(nk, hkv, q.device, decode._tiles(d)[0])
    splits_met = [len(set((row.nonzero().flatten() // chunk).tolist())) for row in allowed.reshape(-1, nk)]
    assert max(splits_met) > 2 * decode.merge_block(triton.cdiv(nk, chunk), chunk, window or 0)
    out, lse = decode.decode_attention_fwd(
        q, k, v, active.to(DEVICE), d**-0.5, key_offset, window or 0, ks.to(DEVICE)
    )
    ref, ref_lse = masked_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), allowed, d**-0.5)
    torch.testing.assert_close(out.double().cpu(), ref, **TOL[torch.float32])
    unrouted = ~active.permute(0, 2, 1)  # (B, Hq, N)
    assert torch.equal(lse.cpu().isneginf(), unrouted)
    assert not out.cpu().permute(0, 2, 1, 3)[unrouted].any()
    torch.testing.assert_close(lse.cpu()[~unrouted].double(), ref_lse[~unrouted], **TOL[torch.float32])


def test_splits_are_sized_for_the_keys_rows_can_see(monkeypatch):
    """A ring cache's window calls size their splits for window + N - 1 keys, not all slots (a linear cache:
    all keys); on a 132-SM GPU the local branch's 4096-key window at batch 1 (4 K/V heads) gets 64-key splits,
    a 128K global cache 1024."""
    spans = []
    real = decode.split_size
    monkeypatch.setattr(decode, "split_size", lambda nk, *rest: spans.append(nk) or real(nk, *rest))
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 4, 64, generator=gen).to(DEVICE)
    k = torch.randn(1, 150, 2, 64, generator=gen).to(DEVICE)
    v = torch.randn(1, 150, 2, 64, generator=gen).to(DEVICE)
    filled = torch.tensor([400], dtype=torch.int32, device=DEVICE)
    decode.decode_attention_fwd(q, k, v, None, 0.125, 0, 40, None, filled, ring=True)
    decode.decode_attention_fwd(q, k, v, None, 0.125, 0, 40, None)
    decode.decode_attention_fwd(q, k, v, torch.ones(1, 2, dtype=torch.bool, device=DEVICE), 0.125, 0, 0, None)
    assert spans == [41, 150, 150]
    monkeypatch.setattr(decode, "interpreting", lambda: False)
    monkeypatch.setattr(decode, "_sm_count", lambda index: 132)
    cpu = torch.device("cpu")
    assert real(4096, 4, cpu, 64) == 64
    assert real(131072, 4, cpu, 64) == 1024
    assert real(4096, 32, cpu, 64) == 256  # batch 8: 16 splits of 4 blocks already fill the GPU
