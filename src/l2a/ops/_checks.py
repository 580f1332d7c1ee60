"""Input validation shared by every attention op. Errors name the offending argument."""

from __future__ import annotations

import weakref

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
    """Shape, dtype and device always; the values (start at 0, end at N, non-decreasing) as
    `check_cu_seqlens_values` decides."""
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
    check_cu_seqlens_values(cu_seqlens, n)


# The last cu_seqlens found valid: (weak reference, version counter, N). A model passes one tensor to the
# attention ops of all its layers; only the first call reads its values.
_last_valid_cu_seqlens: tuple[weakref.ref, int, int] | None = None


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # inference-mode tensors keep no version counter
        return None


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, n: int) -> None:
    """ValueError unless `cu_seqlens` starts at 0, ends at `n` and never decreases (else the Triton
    kernels and the PyTorch reference would silently disagree about the documents).

    Reading the values is a host sync for a CUDA tensor, so it is done once per tensor (the same tensor
    passed to every layer of a forward is read at its first layer; an in-place change is seen through the
    version counter) and skipped while torch.compile traces or a CUDA graph is captured, where it cannot sync.
    """
    global _last_valid_cu_seqlens
    if torch.compiler.is_compiling():
        return
    if cu_seqlens.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    version = _version(cu_seqlens)
    last = _last_valid_cu_seqlens
    if version is not None and last is not None and last[0]() is cu_seqlens and last[1:] == (version, n):
        return
    first, last_value, decreasing = torch.stack(
        [cu_seqlens[0], cu_seqlens[-1], (cu_seqlens[1:] < cu_seqlens[:-1]).any().to(cu_seqlens.dtype)]
    ).tolist()  # one transfer for the three facts
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {first}")
    if last_value != n:
        raise ValueError(f"cu_seqlens must end at seqlen {n}, got {last_value}")
    if decreasing:
        values = cu_seqlens.tolist()
        i = next(i for i in range(1, len(values)) if values[i] < values[i - 1])
        raise ValueError(
            f"cu_seqlens must be non-decreasing (cumulative document lengths), but cu_seqlens[{i}]="
            f"{values[i]} < cu_seqlens[{i - 1}]={values[i - 1]}"
        )
    if version is not None:
        _last_valid_cu_seqlens = (weakref.ref(cu_seqlens), version, n)


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
