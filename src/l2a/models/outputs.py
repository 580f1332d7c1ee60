"""Output dataclasses of the L2A models: the HF fields plus router statistics and the regulariser."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from l2a.models._compat import CACHE_FIELD


def _with_cache_field(cls: type) -> type:
    """Rename the class's `past_key_values` field to the installed release's cache field name (`cache` in
    newer transformers), keeping the field order, then make it a dataclass."""
    if CACHE_FIELD != "past_key_values":
        annotations = dict(cls.__annotations__)
        cls.__annotations__ = {
            (CACHE_FIELD if name == "past_key_values" else name): kind for name, kind in annotations.items()
        }
        setattr(cls, CACHE_FIELD, None)
        delattr(cls, "past_key_values")
    return dataclass(cls)


@_with_cache_field
class L2AModelOutputWithPast(ModelOutput):
    """Output of `L2AModel`.

    router_fraction: float32 (num_global_layers,), fraction of valid tokens routed to global attention in each
        layer of `config.global_layers` (in that order). Stays on the device.
    router_regularizer: float32 scalar, sum over valid tokens of soft^2 (soft for `router_penalty="l1"`)
        per sequence, mean over the batch, mean over global layers (0 without global layers).
    router_head_fraction: float32 (num_global_layers, Hq), fraction of valid tokens routed per query head
        (head-wise routers, AHA); None for token-wise routers.
    """

    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_fraction: torch.FloatTensor | None = None
    router_regularizer: torch.FloatTensor | None = None
    router_head_fraction: torch.FloatTensor | None = None


@_with_cache_field
class L2ACausalLMOutputWithPast(ModelOutput):
    """Output of `L2AForCausalLM`: `loss = lm_loss + lambda * router_regularizer` when labels are given;
    `router_fraction` and `router_regularizer` as in `L2AModelOutputWithPast`."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    lm_loss: torch.FloatTensor | None = None
    router_regularizer: torch.FloatTensor | None = None
    router_fraction: torch.FloatTensor | None = None
    router_head_fraction: torch.FloatTensor | None = None
