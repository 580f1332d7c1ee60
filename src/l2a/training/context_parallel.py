"""Context parallelism (Ulysses): each of C ranks holds a contiguous shard of every sequence.

Everything outside attention (embeddings, norms, projections, router, MLP, loss) is token-wise and runs on
the local shard. Around each attention op an all-to-all trades sequence shards for head shards: rank j
gets the *whole* sequence for query heads [j·Hq/C, (j+1)·Hq/C) and KV heads [j·Hkv/C, ...), runs the
unchanged single-device op (`l2a.ops`), and a second all-to-all brings the output back to its sequence
shard. So routed global attention, sliding windows across shard boundaries, packed documents
(`cu_seqlens` of the whole sequence) and leakage steps behave exactly as on one device; the router's
token-wise decision `active` is all-gathered to the whole sequence for the op.

Limits: C must divide Hq, and divide Hkv or be a multiple of it (KV heads are then replicated C / Hkv
times before the exchange); so C ≤ Hq. Beyond that (or to overlap communication), ring attention over key
blocks is the next step; it needs the kernels to merge partial softmaxes (their `lse` output).

Legend: B batch, N whole sequence, n = N / C local tokens, Hq, Hkv heads, D head dim.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from l2a import ops
from l2a.layers import L2ADecoderLayer
from l2a.layers.attention_ops import override_attention_ops
from l2a.models.modeling import _document_positions
from l2a.ops.linear_cross_entropy import shift_labels


class _AllToAll(torch.autograd.Function):
    """x (C, ...) -> y (C, ...) with y[i] on rank r = x[r] on rank i. The exchange is its own transpose,
    so the backward sends the gradient the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        y = torch.empty_like(x)
        dist.all_to_all_single(y, x, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


class ContextParallel:
    """Ulysses context parallelism over `group` (size C, this process at `index` in it).

    `shard(batch)` cuts a whole-sequence micro-batch into this rank's shard; `activate()` makes the L2A
    layers call the wrapped attention ops below; `reduce_statistics` sums / averages the model's router
    statistics over the group.
    """

    def __init__(self, group: dist.ProcessGroup, size: int, index: int):
        self.group = group
        self.size = size
        self.index = index

    # -- sequence <-> heads -------------------------------------------------------------------------
    def seq_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, n, H, ...) -> (B, N, H / C, ...) on this rank's head shard."""
        b, n, h = x.shape[:3]
        rest = x.shape[3:]
        parts = x.reshape(b, n, self.size, h // self.size, *rest).movedim(2, 0)
        gathered = _AllToAll.apply(parts, self.group)  # (C source shards, B, n, H / C, ...)
        return gathered.movedim(0, 1).reshape(b, self.size * n, h // self.size, *rest)

    def heads_to_seq(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, H / C, ...) -> (B, n, H, ...), the inverse of `seq_to_heads`."""
        b, big_n, h = x.shape[:3]
        rest = x.shape[3:]
        n = big_n // self.size
        parts = x.reshape(b, self.size, n, h, *rest).movedim(1, 0)
        gathered = _AllToAll.apply(parts, self.group)  # (C head shards, B, n, H / C, ...)
        return gathered.movedim(0, 2).reshape(b, n, self.size * h, *rest)

    def _kv_to_heads(self, k: torch.Tensor) -> torch.Tensor:
        hkv = k.shape[2]
        if hkv % self.size != 0:  # fewer KV heads than ranks: replicate each, C / Hkv times
            k = k.repeat_interleave(self.size // hkv, dim=2)
        return self.seq_to_heads(k)

    def _active_to_heads(self, active: torch.Tensor) -> torch.Tensor:
        if active.dim() == 3:  # head-wise (B, n, Hq)
            return self.seq_to_heads(active.to(torch.uint8)[..., None])[..., 0].bool()
        parts = [torch.empty_like(active, dtype=torch.uint8) for _ in range(self.size)]
        dist.all_gather(parts, active.to(torch.uint8).contiguous(), group=self.group)
        return torch.cat(parts, dim=1).bool()

    def _attend(self, op, q, k, v, extra: tuple, key_start, return_lse: bool, kwargs: dict[str, Any]):
        if key_start is not None:
            raise ValueError(
                "context parallelism does not support key_start (padding masks); pack documents instead"
            )
        result = op(
            self.seq_to_heads(q),
            self._kv_to_heads(k),
            self._kv_to_heads(v),
            *extra,
            return_lse=return_lse,
            **kwargs,
        )
        if not return_lse:
            return self.heads_to_seq(result)
        out, lse = result  # lse (B, Hq / C, N)
        lse = self.heads_to_seq(lse.transpose(1, 2)[..., None])[..., 0].transpose(1, 2)
        return self.heads_to_seq(out), lse

    def conditional_attention(
        self, q, k, v, active, *, key_start=None, return_lse: bool = False, **kwargs
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`l2a.ops.conditional_attention` on sequence shards: q (B, n, Hq, D), k, v (B, n, Hkv, D), active
        (B, n) or (B, n, Hq); `cu_seqlens` (of the whole sequence) and the other arguments as there."""
        extra = (self._active_to_heads(active),)
        return self._attend(ops.conditional_attention, q, k, v, extra, key_start, return_lse, kwargs)

    def sliding_window_attention(
        self, q, k, v, window, *, key_start=None, return_lse: bool = False, **kwargs
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`l2a.ops.sliding_window_attention` on sequence shards (shapes as `conditional_attention`)."""
        return self._attend(ops.sliding_window_attention, q, k, v, (window,), key_start, return_lse, kwargs)

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        """Within the block (forward *and* backward: checkpointed layers recompute there) the L2A layers of
        this process attend through the all-to-all wrappers."""
        with override_attention_ops(
            conditional_attention=self.conditional_attention,
            sliding_window_attention=self.sliding_window_attention,
        ):
            yield

    # -- data and statistics ------------------------------------------------------------------------
    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A whole-sequence micro-batch (input_ids, labels (B, N), optional position_ids, cu_seqlens) ->
        this rank's contiguous shard: input_ids, position_ids (global positions), shift_labels (the
        next-token targets, shifted before cutting), cu_seqlens unchanged (it describes the whole row)."""
        if "attention_mask" in batch:
            raise ValueError("context parallelism takes no attention_mask; pack documents with cu_seqlens")
        ids = batch["input_ids"]
        total = ids.shape[1]
        if total % self.size != 0:
            raise ValueError(
                f"sequence length {total} is not a multiple of parallel.context_parallel={self.size}"
            )
        positions = batch.get("position_ids")
        if positions is None:
            if "cu_seqlens" in batch:
                positions = _document_positions(batch["cu_seqlens"], total)
            else:
                positions = torch.arange(total, device=ids.device)[None]
        positions = positions.expand(ids.shape[0], -1)
        n = total // self.size
        cut = slice(self.index * n, (self.index + 1) * n)
        out = {
            "input_ids": ids[:, cut],
            "position_ids": positions[:, cut],
            "shift_labels": shift_labels(batch["labels"])[:, cut],
        }
        if "cu_seqlens" in batch:
            out["cu_seqlens"] = batch["cu_seqlens"]
        return out

    def reduce_statistics(
        self, router_fraction: torch.Tensor, router_regularizer: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Local (per-shard) statistics -> those of the whole sequences (detached): the routed fraction is
        the mean over the equal shards, the regulariser (a per-sequence sum) the sum over them."""
        packed = torch.cat([router_fraction.detach().float() / self.size, router_regularizer.detach()[None]])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.group)
        return packed[:-1], packed[-1]


def apply_context_parallel(model: nn.Module, size: int) -> ContextParallel | None:
    """Check that `model` can be split over `size` ranks and build the groups of `size` consecutive ranks
    (collective: every rank calls it). Returns None for size 1."""
    if size == 1:
        return None
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "l2a":
        raise ValueError(
            f"parallel.context_parallel={size} needs an L2A model (its layers attend through "
            f"l2a.layers.attention_ops), got {type(model).__name__}"
        )
    # Only layers whose attention goes through l2a.layers.attention_ops are split correctly; another layer
    # class (e.g. one calling an op of its own) would attend within its shard only.
    others = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if isinstance(m, GradientCheckpointingLayer) and type(m) is not L2ADecoderLayer
        }
    )
    if others:
        raise ValueError(
            f"parallel.context_parallel={size} supports L2ADecoderLayer only (its attention goes through "
            f"l2a.layers.attention_ops), got {others}"
        )
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world % size != 0:
        raise ValueError(
            f"parallel.context_parallel={size} must divide the number of processes ({world}); "
            f"launch with torchrun --nproc-per-node a multiple of {size}"
        )
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    if hq % size != 0 or (hkv % size != 0 and size % hkv != 0):
        raise ValueError(
            f"parallel.context_parallel={size} must divide the query heads ({hq}) and divide or be a "
            f"multiple of the KV heads ({hkv})"
        )
    rank = dist.get_rank()
    mine = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = group
    return ContextParallel(mine, size, rank % size)
