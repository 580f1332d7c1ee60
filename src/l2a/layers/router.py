"""Router: decides per token (or per token and head) whether the global attention branch runs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass
class RoutingDecision:
    """What a router decided for one layer. Shapes (B, N) token-wise or (B, N, H) head-wise.

    Attributes:
        soft: float32 `sigmoid(logit / temperature)`; the regulariser and the STE gradient use it.
        hard: bool, True where global attention runs.
        gate: multiplier of the global output, in the compute dtype: in training `hard + soft - soft.detach()`
            (straight-through: forward value `hard`, gradient of `soft`); otherwise `hard` itself.
    """

    soft: torch.Tensor
    hard: torch.Tensor
    gate: torch.Tensor


class Router(nn.Module):
    """Linear map hidden -> `out_features` logits (no bias, zero init), plus a fixed `offset`, thresholded
    after a tempered sigmoid: `soft = sigmoid((w·h + offset) / temperature)`.

    `out_features=1` gives L2A's token-wise decision (B, N); `out_features=Hq` a head-wise one (B, N, Hq).
    Zero init makes `soft = sigmoid(offset / temperature)`: with the paper's `offset = 0`, `soft = 0.5 >=
    threshold` sits exactly on the threshold, every token starts routed and the sign of the first update
    decides each token; `offset > 0` starts the routers inside the global side (docs/reproduction.md).
    """

    def __init__(
        self,
        hidden_size: int,
        out_features: int = 1,
        *,
        temperature: float = 0.1,
        threshold: float = 0.5,
        offset: float = 0.0,
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
        if not math.isfinite(offset):
            raise ValueError(f"offset must be a finite number, got {offset}")
        self.out_features = out_features
        self.temperature = temperature
        self.threshold = threshold
        self.offset = float(offset)
        self.weight = nn.Parameter(torch.zeros(out_features, hidden_size))

    def forward(
        self,
        hidden_states: torch.Tensor,
        force: Literal["all", "none", "random"] | None = None,
        random_fraction: float | None = None,
        logits: torch.Tensor | None = None,
    ) -> RoutingDecision:
        """hidden_states (B, N, hidden) -> RoutingDecision of shape (B, N) or (B, N, out_features).

        logits: float32 (B, N, out_features) `linear(hidden_states, weight)` when already computed (decode
        steps: by the norm's kernel, `l2a.ops.norm.rms_norm_and_logits`), else None.

        `force` ("all" / "none" / "random") overrides the hard decision; the gate is then the constant
        decision (no straight-through gradient), while `soft` still comes from the router. "random" routes
        each token (and head) independently with probability `random_fraction`, drawn from torch's global
        generator on the device (seed it for reproducible draws); `random_fraction` is required with
        "random" and refused otherwise.
        """
        if (force == "random") != (random_fraction is not None):
            raise ValueError(
                f"random_fraction is required with force='random' and only with it, got force={force!r}, "
                f"random_fraction={random_fraction!r}"
            )
        if logits is None:
            logits = nn.functional.linear(hidden_states, self.weight).float()
        elif logits.shape != (*hidden_states.shape[:-1], self.out_features) or logits.dtype != torch.float32:
            raise ValueError(
                f"router logits must be float32 {(*hidden_states.shape[:-1], self.out_features)}, got "
                f"{logits.dtype} {tuple(logits.shape)}"
            )
        if self.offset:
            logits = logits + self.offset
        if self.out_features == 1:
            logits = logits.squeeze(-1)
        soft = torch.sigmoid(logits / self.temperature)
        if force is None:
            hard = soft >= self.threshold
        elif force == "all":
            hard = torch.ones_like(soft, dtype=torch.bool)
        elif force == "none":
            hard = torch.zeros_like(soft, dtype=torch.bool)
        elif force == "random":
            hard = torch.rand(soft.shape, device=soft.device) < random_fraction
        else:
            raise ValueError(f"force must be None, 'all', 'none' or 'random', got {force!r}")
        # the compute dtype: under autocast the autocast dtype (an fp32 norm output must not turn the global
        # branch's output, and with it the residual stream, to fp32)
        device_type = hidden_states.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else hidden_states.dtype
        hard_f = hard.to(dtype)
        gate = hard_f + (soft - soft.detach()).to(dtype) if self.training and force is None else hard_f
        return RoutingDecision(soft=soft, hard=hard, gate=gate)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.weight.shape[1]}, out_features={self.out_features}, "
            f"temperature={self.temperature}, threshold={self.threshold}"
            + (f", offset={self.offset}" if self.offset else "")
        )
