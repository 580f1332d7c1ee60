"""Input validation shared by every attention op. Errors name the offending argument."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
BACKENDS = ("auto", "triton", "torch")
# What the Triton kernels (`l2a.ops.triton`) take; backend="auto" uses PyTorch for anything else.
TRITON_HEAD_DIMS = (32, 64, 128)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """Validate (B, N, Hq, D) queries against (B, Nk, Hkv, D) keys/values; returns B, N, Nk, Hq, Hkv, D."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, seqlen, heads, head_dim), got {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: bfloat16, float16, float32, float64")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, n, hq, d = q.shape
    bk, nk, hkv, dk = k.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if bk != b:
        raise ValueError(f"q has batch {b} but k/v have batch {bk}")
    if dk != d:
        raise ValueError(f"q has head_dim {d} but k/v have head_dim {dk}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for grouped-query attention"
        )
    if nk < n:
        raise ValueError(
            f"k/v have {nk} tokens but q has {n}: queries are aligned to the last key, "
            "so need seqlen_k >= seqlen_q"
        )
    return b, n, nk, hq, hkv, d


def check_active(active: torch.Tensor, b: int, n: int, hq: int, device: torch.device) -> None:
    """`active` is bool (B, N) for token-wise or (B, N, Hq) for head-wise routing."""
    if not isinstance(active, torch.Tensor):
        raise TypeError(f"active must be a bool tensor, got {type(active).__name__}")
    if active.dtype != torch.bool:
        raise TypeError(f"active must have dtype torch.bool, got {active.dtype}")
    if tuple(active.shape) not in ((b, n), (b, n, hq)):
        raise ValueError(
            f"active must have shape (batch, seqlen)=({b}, {n}) or "
            f"(batch, seqlen, q_heads)=({b}, {n}, {hq}), got {tuple(active.shape)}"
        )
    if active.device != device:
        raise ValueError(f"active is on {active.device} but q is on {device}")


def check_cu_seqlens(cu_seqlens: torch.Tensor | None, b: int, n: int, nk: int, device: torch.device) -> None:
    if cu_seqlens is None:
        return
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor of num_docs + 1 cumulative document lengths")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must have dtype torch.int32, got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}")
    if b != 1:
        raise ValueError(f"cu_seqlens describes packed documents and needs batch 1, got batch {b}")
    if n != nk:
        raise ValueError("cu_seqlens needs seqlen_q == seqlen_k (packed self-attention)")


def check_key_start(key_start: torch.Tensor | None, b: int, device: torch.device) -> None:
    if key_start is None:
        return
    if not isinstance(key_start, torch.Tensor) or tuple(key_start.shape) != (b,):
        raise ValueError(f"key_start must be an int tensor of shape (batch,)=({b},)")
    if key_start.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"key_start must be int32 or int64, got {key_start.dtype}")
    if key_start.device != device:
        raise ValueError(f"key_start is on {key_start.device} but q is on {device}")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_nonnegative_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
