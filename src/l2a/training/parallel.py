"""Process group set-up and data parallelism applied from outside the (single-device) model.

`parallel="ddp"` wraps the model in `DistributedDataParallel`; `parallel="fsdp"` applies FSDP2
(`torch.distributed.fsdp.fully_shard`) to every decoder layer (`model._no_split_modules`) and then to the
root, with a bf16 `MixedPrecisionPolicy` (fp32 gradient reduction) when training in bf16.
Launch with `torchrun --nproc-per-node N -m l2a train CONFIG`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """rank / world_size of this process, its device, and whether `init_distributed` created the group."""

    rank: int
    world_size: int
    device: torch.device
    created_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(parallel: str, device: str | None = None) -> DistInfo:
    """Join the process group started by torchrun (env `WORLD_SIZE` > 1), or use an existing one.

    device: "cpu", "cuda" (this process's GPU: `LOCAL_RANK`) or "cuda:N"; None = "cuda" when available.
    A group created here uses NCCL on CUDA, gloo on CPU. Raises when several processes run with
    `parallel="none"`.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available")
        if resolved.index is None:
            resolved = torch.device(
                "cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
            )
        torch.cuda.set_device(resolved)
    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
        created = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1 and parallel == "none":
        raise ValueError(
            f"{world} processes were launched but parallel='none'; set parallel to 'ddp' or 'fsdp'"
        )
    return DistInfo(rank=rank, world_size=world, device=resolved, created_group=created)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} declares no decoder layer class in `_no_split_modules`; "
            "FSDP needs it to shard layer by layer"
        )
    return layers


def wrap_model(model: nn.Module, parallel: str, info: DistInfo, *, bf16: bool) -> nn.Module:
    """Apply DDP or FSDP2 when more than one process runs; otherwise return `model` unchanged."""
    if not info.distributed:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs: dict[str, Any] = {"mesh": init_device_mesh(info.device.type, (info.world_size,))}
        if bf16:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in _decoder_layers(model):
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        return model
    raise ValueError(f"parallel must be 'none', 'ddp' or 'fsdp', got {parallel!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside a DDP wrapper (FSDP2 modifies the model in place, so it is returned as is)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Full (unsharded, CPU) state dict on rank 0 for an FSDP model; None otherwise (save the live model)."""
    if not is_fsdp(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state to save on rank 0 (gathered to full tensors for FSDP; collective then)."""
    if not is_fsdp(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of `optimizer_state` (for FSDP every rank passes the full state and keeps its shard)."""
    if not is_fsdp(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
    )


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
