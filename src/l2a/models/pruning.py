"""Post-training pruning: turn layers whose router rarely fires into local-only layers.

A pruned layer loses its router, global norm, global projections and global KV cache;
`config.global_layers` is updated, so a saved model reloads with the same structure.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from l2a.models.modeling import L2AForCausalLM, L2AModel


def prune_global_layers(
    model: L2AForCausalLM | L2AModel,
    layers: Sequence[int] | None = None,
    *,
    threshold: float | None = None,
    fractions: Sequence[float] | torch.Tensor | None = None,
) -> list[int]:
    """Drop the global branch of some layers (in place).

    Pass either `layers` (indices to prune), or `threshold` with `fractions`: the measured routed fraction of
    each layer of `config.global_layers` (same order, e.g. a mean of `output.router_fraction` over an
    evaluation set); layers with fraction < threshold are pruned.

    Returns:
        The indices of the pruned layers, sorted.
    """
    base = model.model if isinstance(model, L2AForCausalLM) else model
    if not isinstance(base, L2AModel):
        raise TypeError(f"model must be an L2AForCausalLM or L2AModel, got {type(model).__name__}")
    config = model.config
    current = list(config.global_layers)
    if (layers is None) == (threshold is None):
        raise ValueError("pass either layers=[...] or threshold=... with fractions=[...]")
    if layers is not None:
        if fractions is not None:
            raise ValueError("fractions is only used together with threshold")
        chosen = sorted({int(i) for i in layers})
        not_global = [i for i in chosen if i not in current]
        if not_global:
            raise ValueError(f"layers {not_global} have no global branch (global layers: {current})")
    else:
        if fractions is None:
            raise ValueError(
                "threshold needs fractions: the routed fraction of each layer in config.global_layers"
            )
        values = [
            float(f) for f in (fractions.tolist() if isinstance(fractions, torch.Tensor) else fractions)
        ]
        if len(values) != len(current):
            raise ValueError(
                f"fractions has {len(values)} entries but the model has {len(current)} "
                f"global layers {current}"
            )
        chosen = [layer for layer, frac in zip(current, values) if frac < threshold]
    for i in chosen:
        base.layers[i].drop_global_branch()
    config.global_layers = [i for i in current if i not in chosen]
    return chosen
