"""Differences between the supported transformers releases, in one place.

transformers renamed the KV-cache field of model outputs and the cache keyword of `forward()` /
`generate()` from `past_key_values` to `cache` (with backward-compatibility shims that pass `cache=` into
output constructors). Everything in l2a that names the cache goes through this module.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from transformers import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast

#: Name of the cache field of HF model outputs in the installed transformers.
CACHE_FIELD: str = (
    "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"
)

#: Name under which `generate()` keeps the cache in its model kwargs and passes it to `forward()`.
CACHE_KWARG: str = (
    "cache"
    if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values"
)


def output_cache(output: Any) -> Any:
    """The KV cache of a model output, whatever the installed release calls the field."""
    return getattr(output, CACHE_FIELD, None)


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """`{name: cache}` to pass a cache to an HF model's `forward()` under the installed release's name."""
    return {CACHE_KWARG: cache}


def pick_cache(past_key_values: Any, cache: Any) -> Any:
    """The cache passed to `forward()` under either name; both at once is an error."""
    if past_key_values is not None and cache is not None:
        raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def enable_activation_checkpointing(model: Any, **checkpoint_kwargs: Any) -> None:
    """Activation (gradient) checkpointing of every decoder layer of an HF model, by the installed release's
    name: `activation_checkpointing_enable` (newer releases, which deprecate the old name) or
    `gradient_checkpointing_enable`. checkpoint_kwargs go to `torch.utils.checkpoint` (e.g. use_reentrant)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
