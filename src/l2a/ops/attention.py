"""Public attention ops. Layout as flash-attn: (B, N, H, D); GQA by passing fewer K/V heads.

Legend: B batch, N query tokens, Nk key tokens (Nk >= N; queries are aligned to the last key,
so query i sits at absolute position i + Nk - N), Hq query heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

import math
import warnings

import torch

from l2a.ops import _checks
from l2a.ops.reference import conditional_attention_reference, sliding_window_attention_reference


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _autocast(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Under autocast, run in the autocast dtype as SDPA does (fp32 norms/rotary tables would otherwise
    hand us fp32 q/k next to a low-precision v)."""
    device_type = q.device.type
    if not torch.is_autocast_enabled(device_type):
        return q, k, v
    dtype = torch.get_autocast_dtype(device_type)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _use_triton_elementwise(backend: str, x: torch.Tensor, supported: bool) -> bool:
    """Backend choice of the fused elementwise ops (norm, rotary, SwiGLU): "torch" -> PyTorch; "triton" -> the
    kernel (triton must be installed); "auto" -> the kernel for CUDA tensors it `supported`s, when triton is
    installed (PyTorch otherwise, silently: the reference formula is exact). `backend` is checked already."""
    if backend == "triton":
        if not _triton_available():
            raise ImportError("backend='triton' needs the `triton` package: pip install 'l2a[triton]'")
        return True
    return backend == "auto" and x.device.type == "cuda" and supported and _triton_available()


def _use_triton(backend: str, q: torch.Tensor) -> bool:
    """backend="auto": Triton for CUDA tensors it supports; PyTorch elsewhere, with a warning on CUDA."""
    _checks.check_backend(backend)
    if backend == "torch":
        return False
    if backend == "triton":
        if not _triton_available():
            raise ImportError("backend='triton' needs the `triton` package: pip install 'l2a[triton]'")
        return True
    if q.device.type != "cuda" or not _triton_available():
        return False
    d = q.shape[-1]
    if d not in _checks.TRITON_HEAD_DIMS or q.dtype not in _checks.TRITON_DTYPES:
        warnings.warn(
            f"backend='auto': the Triton kernels take head_dim in {_checks.TRITON_HEAD_DIMS} and "
            f"{_checks.TRITON_DTYPES}, got head_dim {d} and {q.dtype}; using the PyTorch reference "
            "(slow, O(N^2) memory)",
            stacklevel=3,
        )
        return False
    return True


def _decode_kernels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None):
    """The decode module when few query tokens meet many keys and no gradient is needed (else None)."""
    from l2a.ops.triton import decode

    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    n, hq, hkv = q.shape[1], q.shape[2], k.shape[2]
    if cu_seqlens is None and decode.use_decode(n, k.shape[1], hq, hkv, needs_grad):
        return decode
    return None


def conditional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    active: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    key_offset: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    key_start: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal attention computed only for routed (active) queries; keys and values are all tokens.

    Args:
        q: (B, N, Hq, D). k, v: (B, Nk, Hkv, D), Hq a multiple of Hkv.
        active: bool (B, N) token-wise routing, or (B, N, Hq) head-wise routing.
        softmax_scale: defaults to 1/sqrt(D).
        key_offset: query at position t sees keys j <= t - key_offset (0: L2A global attention;
            W: the far part of AHA, merged with window attention by log-sum-exp).
        cu_seqlens: int32 (num_docs + 1) cumulative document lengths of a packed batch (B = 1, Nk = N);
            queries see only keys of their own document.
        key_start: int (B,) first valid key per batch row (left padding); earlier keys are masked.
        return_lse: also return the log-sum-exp of the scores, float32 (B, Hq, N).
        backend: "auto" (Triton on CUDA for head_dim 32/64/128 and fp16/bf16/fp32, else PyTorch, with a
            warning on CUDA), "triton" or "torch". With Triton, few query tokens against many keys and no
            gradient (decoding) run the split-key decode kernels (`l2a.ops.triton.decode`).

    Returns:
        out (B, N, Hq, D) in q's dtype (the autocast dtype under autocast); inactive rows and rows
        with no keys are 0 (lse -inf).
    """
    q, k, v = _autocast(q, k, v)
    b, n, nk, hq, _, d = _checks.check_qkv(q, k, v)
    _checks.check_active(active, b, n, hq, q.device)
    _checks.check_nonnegative_int("key_offset", key_offset, 0)
    _checks.check_cu_seqlens(cu_seqlens, b, n, nk, q.device)
    _checks.check_key_start(key_start, b, q.device)
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    if _use_triton(backend, q):
        from l2a.ops.triton import conditional_attention_triton
        from l2a.ops.triton._flash import dispatch

        if (decode := _decode_kernels(q, k, v, cu_seqlens)) is not None:
            args = (q, k, v, active, scale, key_offset, 0, key_start)
            out, lse = dispatch(decode.decode_attention_op, decode.decode_attention_fwd, *args)
        else:
            out, lse = conditional_attention_triton(q, k, v, active, scale, key_offset, cu_seqlens, key_start)
    else:
        out, lse = conditional_attention_reference(q, k, v, active, scale, key_offset, cu_seqlens, key_start)
    return (out, lse) if return_lse else out


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    key_start: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal local attention: the query at position t attends keys t - window < j <= t.

    Args:
        q: (B, N, Hq, D). k, v: (B, Nk, Hkv, D), Hq a multiple of Hkv.
        window: number of keys seen, the query's own included (>= 1).
        softmax_scale, cu_seqlens, key_start, return_lse, backend: as in `conditional_attention`.

    Returns:
        out (B, N, Hq, D) in q's dtype (the autocast dtype under autocast) [, lse float32 (B, Hq, N)].
    """
    q, k, v = _autocast(q, k, v)
    b, n, nk, _, _, d = _checks.check_qkv(q, k, v)
    _checks.check_nonnegative_int("window", window, 1)
    _checks.check_cu_seqlens(cu_seqlens, b, n, nk, q.device)
    _checks.check_key_start(key_start, b, q.device)
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    if _use_triton(backend, q):
        from l2a.ops.triton import sliding_window_attention_triton
        from l2a.ops.triton._flash import dispatch

        if (decode := _decode_kernels(q, k, v, cu_seqlens)) is not None:
            args = (q, k, v, None, scale, 0, window, key_start)
            out, lse = dispatch(decode.decode_attention_op, decode.decode_attention_fwd, *args)
        else:
            out, lse = sliding_window_attention_triton(q, k, v, window, scale, cu_seqlens, key_start)
    else:
        out, lse = sliding_window_attention_reference(q, k, v, window, scale, cu_seqlens, key_start)
    return (out, lse) if return_lse else out
