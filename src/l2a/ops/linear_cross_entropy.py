"""LM head + cross-entropy without materialising the full-vocabulary logits.

`linear_cross_entropy(hidden, weight, targets)` equals `cross_entropy((hidden @ weight.T).float(), targets)`
(HF's causal-LM loss: fp32 log-softmax over logits computed in the compute dtype) while holding at most one
chunk of logits at a time. Two implementations:

- "liger": Liger-Kernel's fused linear cross-entropy (Triton, CUDA; `pip install 'l2a[liger]'`). It
  computes the gradients of hidden and weight during the forward, chunk by chunk.
- "chunked": exact PyTorch on any device. The forward sums the loss chunk by chunk over tokens; the
  backward recomputes each chunk's logits and accumulates the weight gradient in float32.

Legend: T tokens (B·N flattened), H hidden size, V vocabulary size.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
from torch.nn import functional as F

LossImpl = Literal["auto", "liger", "chunked", "plain"]
"""How a causal-LM loss is computed: "plain" materialises the logits (HF's loss); "liger" / "chunked" never
do; "auto" = "liger" on CUDA when Liger-Kernel is installed, else "chunked"."""

LOSS_IMPLS: tuple[str, ...] = ("auto", "liger", "chunked", "plain")
DEFAULT_CHUNK_TOKENS = 4096


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_loss_impl(impl: str, device: torch.device) -> Literal["liger", "chunked", "plain"]:
    """The implementation `impl` means on `device`; raises when "liger" is asked for but cannot run."""
    if impl not in LOSS_IMPLS:
        raise ValueError(f"loss_impl must be one of {list(LOSS_IMPLS)}, got {impl!r}")
    if impl == "auto":
        return "liger" if device.type == "cuda" and liger_available() else "chunked"
    if impl == "liger":
        if not liger_available():
            raise ImportError("loss_impl='liger' needs Liger-Kernel: pip install 'l2a[liger]'")
        if device.type != "cuda":
            raise ValueError(f"loss_impl='liger' runs on CUDA only, got a {device.type} tensor")
    return impl  # type: ignore[return-value]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum over tokens of cross-entropy(hidden @ weight.T + bias, targets), float32; logits per chunk only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index: int, chunk: int):
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[start : start + chunk], weight, bias).float()
            total += F.cross_entropy(
                logits, targets[start : start + chunk], ignore_index=ignore_index, reduction="sum"
            )
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.ignore_index, ctx.chunk = ignore_index, chunk
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros(bias.shape, device=bias.device, dtype=torch.float32) if need_b else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[start : start + ctx.chunk]
            t = targets[start : start + ctx.chunk]
            # d(sum CE)/d logits = softmax - onehot on counted rows, 0 on ignored ones (fp32, as autograd)
            grad_logits = torch.softmax(F.linear(h, weight, bias).float(), dim=-1)
            counted = t != ctx.ignore_index
            rows = torch.arange(t.shape[0], device=t.device)
            grad_logits[rows, t.clamp_min(0)] -= counted.float()
            grad_logits.mul_((counted.float() * grad_total)[:, None])
            grad_logits = grad_logits.to(hidden.dtype)
            if need_h:
                grad_h[start : start + ctx.chunk] = grad_logits @ weight
            if need_w:
                grad_w += (grad_logits.T @ h).float()
            if need_b:
                grad_b += grad_logits.float().sum(0)
        return (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    impl: Literal["liger", "chunked"] = "chunked",
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Cross-entropy of the logits `hidden @ weight.T (+ bias)` against `targets`, never holding them whole.

    Args:
        hidden: (..., H), e.g. (B, N, H) final hidden states. weight: (V, H) LM head; bias: (V,) or None.
        targets: int (...) the target token of each position (already shifted: HF's `shift_labels`);
            `ignore_index` positions do not count.
        num_items_in_batch: None = mean over the counted positions; else sum / num_items_in_batch
            (HF's normalisation under gradient accumulation).
        impl: "liger" (CUDA, Liger-Kernel) or "chunked" (PyTorch); see `resolve_loss_impl`.
        chunk_tokens: tokens per chunk of the "chunked" path (its logits: chunk_tokens x V in float32).

    Under autocast the product runs in the autocast dtype, as an autocast `nn.Linear` would.

    Returns:
        float32 scalar.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets {tuple(targets.shape)} must have the shape of hidden without its last dim "
            f"{tuple(hidden.shape[:-1])}"
        )
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    hidden = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    weight = weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    targets = targets.reshape(-1)
    with torch.autocast(device_type, enabled=False):
        if impl == "liger":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            total = liger_fused_linear_cross_entropy(
                hidden,
                weight,
                targets,
                bias=bias,
                ignore_index=ignore_index,
                reduction="sum",
                accum_dtype=torch.float32,
            ).float()
        elif impl == "chunked":
            total = _ChunkedLinearCrossEntropy.apply(
                hidden, weight, bias, targets, ignore_index, chunk_tokens
            )
        else:
            raise ValueError(f"impl must be 'liger' or 'chunked' (resolve 'auto' first), got {impl!r}")
    if num_items_in_batch is None:
        return total / (targets != ignore_index).sum()
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """labels (B, N) -> next-token targets (B, N): position t gets labels[t + 1], the last `ignore_index`
    (HF's causal shift)."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)
