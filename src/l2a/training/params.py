"""Trainable parameter selection: named groups and glob patterns.

Groups (by the module names in the dotted parameter name; the first rule that matches wins):
- `router`: a name component containing "router";
- `embeddings`: a component containing "embed" (token / position embeddings);
- `lm_head`: a component starting with "lm_head";
- `mlp`: a component "mlp" or containing "experts";
- `attention`: a module name containing "attn" or "attention" but not "norm" (local and global q/k/v/o
  projections and the q/k norms inside them);
- `norms`: a module name containing "norm" (input / post-attention / global-branch / final norms);
- `other`: anything else.
"""

from __future__ import annotations

import fnmatch

from torch import nn

from l2a.training.config import TRAINABLE_GROUPS


def classify_parameter(name: str) -> str:
    """Group of the parameter called `name` (as in `model.named_parameters()`)."""
    modules = name.lower().split(".")[:-1]
    if any("router" in p for p in modules):
        return "router"
    if any("embed" in p for p in modules):
        return "embeddings"
    if any(p.startswith("lm_head") for p in modules):
        return "lm_head"
    if any(p == "mlp" or "experts" in p for p in modules):
        return "mlp"
    # `post_attention_layernorm` is a norm, while `self_attn.q_norm` belongs to its attention block.
    if any(("attn" in p or "attention" in p) and "norm" not in p for p in modules):
        return "attention"
    if any("norm" in p for p in modules):
        return "norms"
    return "other"


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Parameter names per group (shared parameters, e.g. tied embeddings, listed once)."""
    groups: dict[str, list[str]] = {g: [] for g in TRAINABLE_GROUPS}
    for name, _ in model.named_parameters():
        groups[classify_parameter(name)].append(name)
    return groups


def set_trainable(model: nn.Module, trainable: list[str]) -> list[str]:
    """Set `requires_grad` True exactly for the parameters selected by `trainable` (group names from
    `TRAINABLE_GROUPS` or glob patterns on parameter names), False for all others.

    Returns the names of the trainable parameters. Raises ValueError when an entry selects nothing.
    """
    selected: set[str] = set()
    names = [name for name, _ in model.named_parameters()]
    for entry in trainable:
        if entry in TRAINABLE_GROUPS:
            hits = [n for n in names if classify_parameter(n) == entry]
        else:
            hits = [n for n in names if fnmatch.fnmatchcase(n, entry)]
        if (
            not hits
            and entry == "lm_head"
            and getattr(getattr(model, "config", None), "tie_word_embeddings", False)
        ):
            raise ValueError(
                "trainable entry 'lm_head': the LM head is tied to the input embeddings; use 'embeddings'"
            )
        if not hits:
            raise ValueError(
                f"trainable entry {entry!r} selects no parameter of {type(model).__name__} "
                f"(groups: {list(TRAINABLE_GROUPS)}, or a glob pattern on names such as {names[:3]})"
            )
        selected.update(hits)
    for name, param in model.named_parameters():
        param.requires_grad_(name in selected)
    return [n for n in names if n in selected]
