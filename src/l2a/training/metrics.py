"""Training statistics kept on the device between log steps, and the log sinks (tqdm, JSONL, TensorBoard)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from l2a.training.parallel import DistInfo, all_reduce_sum

# Dense bf16 peak (TFLOP/s, no sparsity) by substring of the CUDA device name.
_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "B200": 2250.0,
}


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of `device` for the MFU estimate (None when unknown, e.g. on CPU)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in _PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def flops_coefficients(model: nn.Module) -> tuple[float, float]:
    """Dense-equivalent training FLOPs (forward + backward) as `per_token · tokens + per_pair · pairs`.

    per_token = 6·P (non-embedding parameters); per_pair = 6·L·Hq·D for causal attention, where `pairs`
    is Σ over documents of n² (so a token of an n-token document adds 6·L·Hq·D·n). Routing and windows
    make the real cost lower, so MFU computed from it is an estimate of model (not hardware) FLOPs.
    """
    params = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name)
    config = getattr(model, "config", None)
    per_pair = 0.0
    if config is not None and hasattr(config, "num_hidden_layers") and hasattr(config, "num_attention_heads"):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        per_pair = 6.0 * config.num_hidden_layers * config.num_attention_heads * head_dim
    return 6.0 * params, per_pair


def attention_pairs(batch: dict[str, torch.Tensor]) -> int:
    """Σ n² over the documents of a host-side batch (rows of N tokens, or the documents of `cu_seqlens`)."""
    ids = torch.as_tensor(batch["input_ids"])
    if "cu_seqlens" in batch:
        lengths = torch.as_tensor(batch["cu_seqlens"]).diff().long()
        return int(lengths.square().sum())
    rows = ids.shape[0] if ids.dim() == 2 else 1
    return rows * ids.shape[-1] ** 2


LAYER_OFF_SPARSITY = 0.999
"""A layer whose sparsity reaches this routes (almost) no token: its global branch is switched off."""


def switched_off_layers(sparsity_per_layer: list[float]) -> list[int]:
    """Positions (in `sparsity_per_layer`) of the layers that route (almost) no token."""
    return [i for i, s in enumerate(sparsity_per_layer) if s >= LAYER_OFF_SPARSITY]


def routing_collapse(sparsity_per_layer: list[float], regularizer_at_full: bool) -> str | None:
    """The kind of routing collapse shown by one log record's per-layer sparsity, or None.

    "no_token_routed": no token used global attention in any layer (long-range reads are gone);
    "every_token_routed": every token used it in every layer although λ has reached its final value
    (`regularizer_at_full`; the regulariser has no effect). At the start every token is routed
    (zero-initialised routers), which is not a collapse;
    "layers_off": some layers route (almost) no token (sparsity >= `LAYER_OFF_SPARSITY`) while λ is still
    below its final value: they switched off before the regulariser asked for it, the LM loss did
    (docs/reproduction.md; `router_logit_offset` > 0 delays it). Once λ is at its final value a layer
    that routes nothing is a pruning candidate, not a collapse.
    """
    if not sparsity_per_layer:
        return None
    if all(s >= 1.0 for s in sparsity_per_layer):
        return "no_token_routed"
    if regularizer_at_full and all(s <= 0.0 for s in sparsity_per_layer):
        return "every_token_routed"
    if not regularizer_at_full and switched_off_layers(sparsity_per_layer):
        return "layers_off"
    return None


class StepStats:
    """Device-side sums over the micro-steps since the last log; `reduce()` is the only host sync."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        zero = torch.zeros((), device=self.device, dtype=torch.float64)
        self.lm_sum = zero.clone()  # Σ lm_loss · valid tokens
        self.valid_tokens = zero.clone()
        self.reg_sum = zero.clone()  # Σ router_regularizer over micro-steps
        self.fraction_sum: torch.Tensor | None = None  # Σ router_fraction (num_global_layers,)
        self.head_fraction_sum: torch.Tensor | None = None  # Σ router_head_fraction (layers, Hq), AHA
        self.micro_steps = 0
        self.steps = 0
        self.leakage_steps = 0
        self.tokens = 0
        self.flops = 0.0
        self.grad_norm: torch.Tensor | None = None  # of the last step

    def add_micro(
        self,
        lm_token_sum: torch.Tensor,
        valid: torch.Tensor,
        reg: torch.Tensor,
        fraction: torch.Tensor | None,
        head_fraction: torch.Tensor | None = None,
    ) -> None:
        """lm_token_sum: the LM loss summed over the micro-batch's `valid` predicted tokens."""
        self.lm_sum += lm_token_sum.detach().double()
        self.valid_tokens += valid
        self.reg_sum += reg.detach().double()
        if fraction is not None:
            fraction = fraction.detach().double()
            self.fraction_sum = fraction if self.fraction_sum is None else self.fraction_sum + fraction
        if head_fraction is not None:
            head_fraction = head_fraction.detach().double()
            self.head_fraction_sum = (
                head_fraction if self.head_fraction_sum is None else self.head_fraction_sum + head_fraction
            )
        self.micro_steps += 1

    def add_step(self, grad_norm: torch.Tensor, leakage: bool, tokens: int, flops: float) -> None:
        self.grad_norm = grad_norm.detach()
        self.steps += 1
        self.leakage_steps += int(leakage)
        self.tokens += tokens
        self.flops += flops

    def reduce(self, info: DistInfo) -> dict[str, Any]:
        """Means over the interval and over ranks (collective when distributed)."""
        head = torch.stack([self.lm_sum, self.valid_tokens, self.reg_sum])
        parts = [head] if self.fraction_sum is None else [head, self.fraction_sum]
        layers = 0 if self.fraction_sum is None else self.fraction_sum.numel()
        if self.head_fraction_sum is not None:
            parts.append(self.head_fraction_sum.flatten())
        packed = all_reduce_sum(torch.cat(parts), info).cpu()
        lm_sum, valid, reg_sum = packed[:3].tolist()
        micro = self.micro_steps * info.world_size
        out: dict[str, Any] = {
            "lm_loss": lm_sum / max(valid, 1.0),
            "router_regularizer": reg_sum / max(micro, 1),
            "grad_norm": float(self.grad_norm) if self.grad_norm is not None else float("nan"),
            "leakage_steps": self.leakage_steps,
        }
        if self.fraction_sum is not None:
            fraction = (packed[3 : 3 + layers] / max(micro, 1)).tolist()
            out["sparsity_per_layer"] = [1.0 - f for f in fraction]
            out["sparsity"] = sum(out["sparsity_per_layer"]) / len(fraction)
        if self.head_fraction_sum is not None:
            heads = packed[3 + layers :].view(self.head_fraction_sum.shape) / max(micro, 1)
            out["sparsity_per_head"] = (1.0 - heads).tolist()  # [layer][head], layers as global_layers
        return out


class LogWriter:
    """JSONL and (optionally) TensorBoard sinks on rank 0."""

    def __init__(self, output_dir: Path, *, jsonl: bool, tensorboard: bool):
        self.jsonl_path = output_dir / "log.jsonl" if jsonl else None
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError(
                    "logging.tensorboard needs the `tensorboard` package: pip install 'l2a[train]'"
                ) from exc
            self.tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if self.jsonl_path is not None:
            with self.jsonl_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key == "step":
                    continue
                if isinstance(value, list):
                    for i, v in enumerate(value):
                        if isinstance(v, list):  # sparsity_per_head: one curve per (layer, head)
                            for j, x in enumerate(v):
                                self.tb.add_scalar(f"{key}/{i}/{j}", x, step)
                        else:
                            self.tb.add_scalar(f"{key}/{i}", v, step)
                elif isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
