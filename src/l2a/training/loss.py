"""The LM loss of `l2a train` for plain HF causal LMs without full-vocabulary logits.

L2A models fuse the LM head into their loss themselves (`L2AForCausalLM.forward(loss_impl=...)`). For other
HF causal LMs, `fused_lm_loss(model, impl)` makes `model(...)` run the base model and
`l2a.ops.linear_cross_entropy` on its final hidden states for the duration of a block. The forward stays
the module's own (`model.forward` is swapped on the instance), so DDP / FSDP2 hooks, state-dict names and
checkpoints are those of the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from l2a.ops.linear_cross_entropy import linear_cross_entropy, shift_labels

# Config fields of HF models that transform the logits before the loss (the fused loss would skip them).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def check_fusable(model: nn.Module) -> None:
    """Raise when `model`'s loss is not cross-entropy of `lm_head(base_model(...))`."""
    config = getattr(model, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(
                f"{type(model).__name__} transforms its logits ({name}={value}); the fused LM loss does not: "
                "set loss_impl: plain"
            )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or model.base_model is model:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear LM head over a base model; set loss_impl: plain"
        )


@contextlib.contextmanager
def fused_lm_loss(model: nn.Module, impl: str) -> Iterator[None]:
    """Within the block `model(input_ids, labels=..., position_ids=..., attention_mask=...,
    num_items_in_batch=...)` returns `loss` = next-token cross-entropy (HF's shift and normalisation, -100
    ignored) from `linear_cross_entropy(impl=impl)` and `logits=None`."""
    check_fusable(model)
    base, head = model.base_model, model.get_output_embeddings()

    def forward(
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> CausalLMOutputWithPast:
        hidden = base(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        loss = linear_cross_entropy(
            hidden,
            head.weight,
            shift_labels(labels),
            bias=head.bias,
            num_items_in_batch=num_items_in_batch,
            impl=impl,
        )
        return CausalLMOutputWithPast(loss=loss, logits=None)

    model.forward = forward
    try:
        yield
    finally:
        del model.forward  # back to the class's forward
