"""Flash attention over a compact list of query rows, each with its own contiguous key range [lo, hi].

One kernel family serves routed causal attention and sliding-window attention: the host launchers
(`conditional.py`, `sliding_window.py`) only differ in which tokens are listed and how lo/hi are
computed. See `l2a/ops/README.md` for the derivations.

Row layout. Query heads are grouped by the K/V head they read (G = Hq / Hkv). For one batch row b and
one K/V head, the kernel walks L lists of compact tokens; list l holds `count` tokens (positions
sorted ascending) and each token contributes R consecutive rows, one per query head:
    row r of list l -> token idx[r // R], query head hkv * G + l * R + r % R.
Token-wise routing and dense windows use one list shared by all heads (L = 1, R = G: the G heads of
a group share every K/V tile of an M-tile); head-wise routing uses one list per query head
(L = G, R = 1). Pair lists (`Rows.pairs`, all-or-here attention in `aha.py`) hold (token, head) pairs
of one K/V group, slot value t * G + g -> token t, query head hkv * G + g (R = 1). Per-token key bounds
lo/hi are non-decreasing along a list, so a tile's key range is
[lo(first row), hi(last row)] and only the key blocks outside [lo(last row), hi(first row)] need a mask.

This module holds what the kernels share: launch configs, the row lists (`Rows`, `compact_rows`,
`key_bounds`), the tile helpers (`_mma`, `_tile_rows`, `_key_block_ranges`) and the output buffers. The
kernels themselves: `_flash_fwd.py` (forward) and `_flash_bwd.py` (dQ and dK/dV).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from l2a.ops._checks import TRITON_DTYPES, TRITON_HEAD_DIMS

LOG2E = 1.4426950408889634
# Sorts after every real position; pads compact lists so that they stay sorted for searchsorted.
_PAD = 1 << 30

# Tests set this to fill outputs that the kernels must write with NaN first, so unwritten rows show.
POISON_UNWRITTEN = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dispatch(op, launch, *args):
    """Run a Triton op: eager code where no tensor argument needs a gradient calls its launcher `launch`
    directly, everything else (autograd, torch.compile) goes through the custom op `op`; both take `args`.

    The custom op's Python dispatch (autograd wrapper, redispatch, output aliasing checks) cost ~0.1 ms of
    host time per call on the H200 machine's CPU, far more than a kernel launch: with 9 such calls per
    layer it made eager decode steps host-bound (docs/benchmarks.md, session 8)."""
    if torch.compiler.is_compiling():
        return op(*args)
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return op(*args)
    return launch(*args)


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # register cap per thread (Triton's `maxnreg`), so that more programs fit on a multiprocessor
    max_regs: int | None = None

    def launch_options(self) -> dict[str, int]:
        options = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        if self.max_regs is not None:
            options["maxnreg"] = self.max_regs
        return options


def _env_config(name: str, default: Config) -> Config:
    """`L2A_<NAME>=BM,BN,warps,stages[,max_regs]` overrides a launch config (the benchmarks' sweeps)."""
    value = os.environ.get(f"L2A_{name}")
    if not value:
        return default
    fields = [int(x) for x in value.split(",")]
    if len(fields) not in (4, 5):
        raise ValueError(f"L2A_{name} must be BM,BN,warps,stages[,max_regs], got {value!r}")
    return Config(*fields)


INTERPRETER_CONFIG = Config(16, 16, 1, 1)


def gpu_fwd_config(d: int) -> Config:
    # D=128 default: fastest of 4 configs on an H100 (benchmarks/KERNEL_NOTES.md); D<=64 not yet tuned
    return _env_config("FWD", Config(128, 64, 8, 3))


def gpu_bwd_dq_config(d: int) -> Config:
    # D=128: 128,64,8,3 fastest of 5 on an H100 (benchmarks/bench_backward.py, docs/benchmarks.md)
    return _env_config("BWD_DQ", Config(64, 64, 4, 2) if d <= 64 else Config(128, 64, 8, 3))


def gpu_bwd_dkdv_config(d: int) -> Config:
    # D=128: 64,128,8,3 fastest of 2 on an H100 in all four timed cases of 14:45 UTC (docs/benchmarks.md)
    return _env_config("BWD_DKDV", Config(64, 64, 4, 2) if d <= 64 else Config(64, 128, 8, 3))


def gpu_aha_local_fwd_config(d: int) -> Config:
    # AHA's local lists in the "split" forward (W + BLOCK_M / G keys a tile): on an H200 at 32K, W = 256,
    # 64,32,4,3 ran them in 0.66 ms against 0.72-0.79 for 128,64,8,3 / 128,64,8,2 / 64,64,4,3 / 64,64,4,2 /
    # 128,32,8,3 (benchmarks/profile_aha.py, docs/benchmarks.md). The cap of 168 registers (175-184 uncapped;
    # 0-4 spilled with the cap on triton 3.6) fits 3 programs per SM instead of 2: the whole forward at 32K
    # went 1.75 -> 1.71 ms (docs/benchmarks.md, AHA run 5)
    return _env_config("AHA_FWD_LOCAL", Config(64, 32, 4, 3, max_regs=168))


def aha_local_fwd_config(d: int) -> Config:
    return INTERPRETER_CONFIG if interpreting() else gpu_aha_local_fwd_config(d)


def fwd_config(d: int) -> Config:
    """Launch config of the forward kernel (the interpreter runs small tiles, the GPU `gpu_fwd_config`)."""
    return INTERPRETER_CONFIG if interpreting() else gpu_fwd_config(d)


def bwd_dq_config(d: int) -> Config:
    return INTERPRETER_CONFIG if interpreting() else gpu_bwd_dq_config(d)


def bwd_dkdv_config(d: int) -> Config:
    return INTERPRETER_CONFIG if interpreting() else gpu_bwd_dkdv_config(d)


DKDV_LOOPS = ("branch", "masked", "split")


def dkdv_loop() -> str:
    """Row loop of the dK/dV kernel, `L2A_DKDV_LOOP` (see `_bwd_dkdv_kernel`). "split" (default) and "masked"
    have branch-free loop bodies that Triton can software-pipeline; "branch" decides masking per tile and is
    not pipelined. On the H100 (docs/benchmarks.md, before the compact-row backward) "split" was fastest:
    128K s=0.9 fwd+bwd 141 ms against 162 ms ("masked") and 171 ms ("branch")."""
    loop = os.environ.get("L2A_DKDV_LOOP", "split")
    if loop not in DKDV_LOOPS:
        raise ValueError(f"L2A_DKDV_LOOP must be one of {DKDV_LOOPS}, got {loop!r}")
    return loop


def dkdv_phase_order() -> bool:
    """`L2A_DKDV_PHASE` ("1" default, "0" off): with a bounded key span (sliding windows), the "split" dK/dV
    loop starts every key block's rows at a phase point shared by runs of consecutive key blocks and wraps
    around, so the programs that run together read the same rows at the same time (L2 reuse) instead of a
    front of rows `span` wide. On an H100 it made the window-4096 dK/dV kernel 3.4-3.8 % faster at 32K and
    128K (docs/benchmarks.md, benchmarks/KERNEL_NOTES.md)."""
    value = os.environ.get("L2A_DKDV_PHASE", "1")
    if value not in ("0", "1"):
        raise ValueError(f"L2A_DKDV_PHASE must be '0' or '1', got {value!r}")
    return value == "1"


@dataclass
class Rows:
    """Compact query rows of one call.

    idx: int32 (B, Lc, N) token index (in q) of each compact slot; lo, hi: int32 (B, Lc, N) inclusive
    key range of each slot, padded with _PAD past `count`; count: int32 (B, Lc). Lc is 1 (one list
    shared by all heads) or Hq (one list per query head); `lists_per_group` (L) and `rows_per_token` (R)
    as in the module docstring. `span`: the longest key range of a row (the window), when bounded.
    `pairs`: the slots hold (token, head) pair indices t * G + g instead of tokens (then the last dimension
    is N * G and R = 1). `packed`: two lists per group whose counts add up to the slots of one (AHA's
    routed and local pairs); their tiles share one program range (`_tile_rows`).
    """

    idx: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    count: torch.Tensor
    lists_per_group: int
    rows_per_token: int
    span: int | None = None
    pairs: bool = False
    packed: bool = False

    @property
    def shared(self) -> bool:
        return self.idx.shape[1] == 1

    def programs(
        self, hkv: int, block_m: int, slots: int | None = None, tiles_per_program: int = 1
    ) -> tuple[int, int]:
        """(programs, n_lists_total) of a launch over the M-tiles of every list of Hkv groups, `slots`
        (default: all) bounding each list's count, each program taking `tiles_per_program` tiles."""
        b, capacity = self.idx.shape[0], self.idx.shape[-1]
        r = self.rows_per_token
        if self.packed:
            if slots is not None:
                raise ValueError("packed lists take no slot bound: their counts add up to the capacity")
            tiles, n_lists_total = triton.cdiv(capacity * r, block_m) + 1, b * hkv
        else:
            tiles = triton.cdiv((capacity if slots is None else slots) * r, block_m)
            n_lists_total = b * hkv * self.lists_per_group
        return triton.cdiv(tiles, tiles_per_program) * n_lists_total, n_lists_total


def key_bounds(
    n: int,
    nk: int,
    b: int,
    device: torch.device,
    *,
    key_offset: int = 0,
    window: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    key_start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive key range of every query token: lo, hi int32 (B, N); empty when lo > hi."""
    pos = torch.arange(n, device=device, dtype=torch.int32) + (nk - n)
    hi = (pos - key_offset).expand(b, n)
    lo = torch.zeros(b, n, device=device, dtype=torch.int32)
    if key_start is not None:
        lo = torch.maximum(lo, key_start.to(torch.int32)[:, None])
    if cu_seqlens is not None:
        doc = torch.bucketize(pos, cu_seqlens[1:], right=True)
        lo = torch.maximum(lo, cu_seqlens[doc.clamp_max(cu_seqlens.numel() - 1)][None, :])
    if window is not None:
        lo = torch.maximum(lo, pos - (window - 1))
    return lo.contiguous(), hi.contiguous()


def compact_rows(
    active: torch.Tensor | None,
    lo: torch.Tensor,
    hi: torch.Tensor,
    hq: int,
    hkv: int,
    span: int | None = None,
) -> Rows:
    """Gather the active tokens of each list in position order, on the device and without a host sync.

    active: None (all tokens), bool (B, N) token-wise or (B, N, Hq) head-wise. lo, hi: int32 (B, N).
    span: the window of sliding-window attention (see `Rows`). A cumulative sum gives each active token
    its compact slot; inactive tokens scatter to a spill slot N.
    """
    b, n = lo.shape
    group = hq // hkv
    if active is None:
        idx = torch.arange(n, device=lo.device, dtype=torch.int32).expand(b, 1, n).contiguous()
        count = torch.full((b, 1), n, device=lo.device, dtype=torch.int32)
        return Rows(idx, lo[:, None].contiguous(), hi[:, None].contiguous(), count, 1, group, span)
    lists = active[:, None, :] if active.dim() == 2 else active.permute(0, 2, 1)
    slot = torch.cumsum(lists, dim=-1, dtype=torch.int32)
    count = slot[..., -1].clone()  # its own storage: the conditional op returns it
    dest = torch.where(lists, slot - 1, n).long()
    token = torch.arange(n, device=lo.device, dtype=torch.int32).expand_as(lists)
    idx = torch.zeros(*lists.shape[:-1], n + 1, device=lo.device, dtype=torch.int32)
    idx.scatter_(-1, dest, token)
    idx = idx[..., :n].contiguous()
    filled = torch.arange(n, device=lo.device)[None, None, :] < count[..., None]
    lo_c = torch.where(filled, torch.gather(lo[:, None].expand_as(idx), -1, idx.long()), _PAD)
    hi_c = torch.where(filled, torch.gather(hi[:, None].expand_as(idx), -1, idx.long()), _PAD)
    if active.dim() == 2:
        return Rows(idx, lo_c.contiguous(), hi_c.contiguous(), count, 1, group, span)
    return Rows(idx, lo_c.contiguous(), hi_c.contiguous(), count, group, 1, span)


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    """a @ b (+ acc) in float32. DOT_PRECISION "upcast": 16-bit operands converted to float32 first,
    for the Triton interpreter, whose dot multiplies bfloat16 tensors as their raw uint16 bits."""
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _tile_rows(
    pid,
    IDX,
    LO,
    HI,
    CNT,
    stride_ib,
    stride_il,
    stride_cb,
    stride_cl,
    n_lists_total,
    hkv_heads,
    n_lists,
    group,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PAIRS: tl.constexpr,
    PACKED: tl.constexpr,
):
    """Decode a program id into (batch, K/V head, list, M-tile) and load the tile's rows.

    Programs are ordered heavy-first: the last tiles of every list (latest positions, longest key
    ranges) start first; m_tile < 0 marks a program past the end of its list. PACKED (two lists per
    group, n_lists_total = B Hkv): the tiles of a group's first list, then those of its second, share one
    range of cdiv(rows of both, BLOCK_M) + 1 programs, so a short first list (AHA's routed pairs) leaves
    no empty programs; its tiles, the heavy ones, start first.
    """
    blh = pid % n_lists_total
    m_rev = pid // n_lists_total
    if PACKED:
        b = blh // hkv_heads
        hkv = blh % hkv_heads
        cnt_off = b * stride_cb + 2 * hkv * stride_cl
        count_first = tl.load(CNT + cnt_off)
        tiles_first = tl.cdiv(count_first * R, BLOCK_M)
        li = (m_rev >= tiles_first).to(tl.int32)
        count = tl.where(li == 0, count_first, tl.load(CNT + cnt_off + stride_cl))
        m_rev = m_rev - li * tiles_first
    else:
        b = blh // (hkv_heads * n_lists)
        hl = blh % (hkv_heads * n_lists)
        hkv = hl // n_lists
        li = hl % n_lists
        count = tl.load(CNT + b * stride_cb + (hkv * n_lists + li) * stride_cl)
    b = b.to(tl.int64)
    n_rows = count * R
    m_tile = tl.cdiv(n_rows, BLOCK_M) - 1 - m_rev
    # programs past the end (m_tile < 0) exit in the caller; clamping keeps their loads in bounds, and
    # masking their loads off lets them exit without waiting for memory (a short list in a long grid)
    live = m_tile >= 0
    m_start = tl.maximum(m_tile, 0) * BLOCK_M
    rows = m_start + tl.arange(0, BLOCK_M)
    row_valid = rows < tl.where(live, n_rows, 0)
    slot = rows // R
    list_off = b * stride_ib + (hkv * n_lists + li) * stride_il
    tok = tl.load(IDX + list_off + slot, mask=row_valid, other=0)
    if PAIRS:
        # 32-bit division (slots < N G < 2^31): a 64-bit one is a subroutine call on sm_90, paid at the
        # start of every tile (the AHA forward at 32K: 1.83 -> 1.75 ms on an H200)
        head = hkv * group + tok % group
        tok = tok // group
    else:
        head = hkv * group + li * R + rows % R
    tok = tok.to(tl.int64)
    lo_r = tl.load(LO + list_off + slot, mask=row_valid, other=0)
    hi_r = tl.load(HI + list_off + slot, mask=row_valid, other=-1)
    first_slot = m_start // R
    last_slot = tl.maximum(tl.minimum(m_start + BLOCK_M, n_rows) - 1, 0) // R
    lo_first = tl.load(LO + list_off + first_slot, mask=live, other=0)
    hi_first = tl.load(HI + list_off + first_slot, mask=live, other=-1)
    lo_last = tl.load(LO + list_off + last_slot, mask=live, other=0)
    hi_last = tl.load(HI + list_off + last_slot, mask=live, other=-1)
    return b, hkv, li, m_tile, row_valid, tok, head, lo_r, hi_r, lo_first, hi_first, lo_last, hi_last


@triton.jit
def _key_block_ranges(lo_first, hi_first, lo_last, hi_last, BLOCK_N: tl.constexpr):
    """Key blocks [kb_lo, kb_hi) touched by a tile; [u0, u1) inside every row's range (no mask needed)."""
    # all operands kept >= 0 so integer division rounds the same on the GPU and in the interpreter
    kb_lo = tl.maximum(lo_first, 0) // BLOCK_N
    kb_hi = tl.where(hi_last >= lo_first, tl.maximum(hi_last + 1, 0), 0)
    kb_hi = tl.maximum(tl.cdiv(kb_hi, BLOCK_N), kb_lo)
    u0 = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(lo_last, 0), BLOCK_N), kb_lo), kb_hi)
    u1 = tl.minimum(tl.maximum(tl.maximum(hi_first + 1, 0) // BLOCK_N, u0), kb_hi)
    return kb_lo, u0, u1, kb_hi


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs get exact float32 products (tf32 would miss the float32 tolerance by ~1e-3)
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if interpreting() else "tf32"


def _list_strides(rows: Rows) -> tuple[int, int, int, int]:
    stride_ib = rows.idx.stride(0)
    stride_il = 0 if rows.shared else rows.idx.stride(1)
    stride_cb = rows.count.stride(0)
    stride_cl = 0 if rows.shared else rows.count.stride(1)
    return stride_ib, stride_il, stride_cb, stride_cl


def _row_outputs(q: torch.Tensor, active: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """out-like (B, N, Hq, D) and lse-like (B, Hq, N) buffers: inactive rows preset to 0 / -inf."""
    b, n, hq, d = q.shape
    if active is None:
        if POISON_UNWRITTEN:
            return torch.full_like(q, float("nan")), q.new_full((b, hq, n), float("nan"), dtype=torch.float32)
        return torch.empty_like(q), q.new_empty((b, hq, n), dtype=torch.float32)
    if not POISON_UNWRITTEN:
        return torch.zeros_like(q), q.new_full((b, hq, n), float("-inf"), dtype=torch.float32)
    inactive = ~(active[:, :, None] if active.dim() == 2 else active).expand(b, n, hq)
    out = torch.full_like(q, float("nan")).masked_fill_(inactive[..., None], 0.0)
    lse = q.new_full((b, hq, n), float("nan"), dtype=torch.float32).masked_fill_(
        inactive.permute(0, 2, 1), float("-inf")
    )
    return out, lse


def _contiguous_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def check_supported(q: torch.Tensor) -> None:
    """Kernel-specific limits beyond `l2a.ops._checks`."""
    d = q.shape[-1]
    if d not in TRITON_HEAD_DIMS:
        raise ValueError(f"the Triton attention kernels support head_dim in {TRITON_HEAD_DIMS}, got {d}")
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"the Triton attention kernels support float16, bfloat16 and float32, got {q.dtype}")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"the Triton attention kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {q.device}"
        )
