"""Post-training pruning: turn layers whose router rarely fires into local-only layers.

A pruned layer loses its router, global norm, global projections and global KV cache;
`config.global_layers` is updated, so a saved model reloads with the same structure.
AHA models (`config.method == "aha"`) can also lose single heads (`prune_routed_heads`): a pruned head
always uses window attention; a layer left without routed heads becomes a window-only layer with a bounded
KV cache.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
        if config.method == "aha":
            config.routed_heads[i] = []
    config.global_layers = [i for i in current if i not in chosen]
    return chosen


def prune_routed_heads(
    model: L2AForCausalLM | L2AModel,
    heads: Mapping[int, Sequence[int]] | None = None,
    *,
    threshold: float | None = None,
    fractions: Sequence[Sequence[float]] | torch.Tensor | None = None,
) -> dict[int, list[int]]:
    """Send some query heads of an AHA model to window attention for good (in place).

    Pass either `heads` ({layer: [query heads]}) or `threshold` with `fractions`: the measured routed fraction
    of every query head, (num_global_layers, Hq) in the order of `config.global_layers` (e.g. the mean of
    `output.router_head_fraction` over an evaluation set); heads with fraction < threshold are pruned.
    The router rows of pruned heads are removed; layers left with no routed head lose their router
    (`prune_global_layers`), so their KV cache becomes bounded by the window.

    Returns:
        {layer: pruned heads (sorted)} for every layer that lost heads.
    """
    base = model.model if isinstance(model, L2AForCausalLM) else model
    if not isinstance(base, L2AModel) or model.config.method != "aha":
        raise TypeError("prune_routed_heads needs an AHA model (config.method == 'aha')")
    config = model.config
    current = list(config.global_layers)
    if (heads is None) == (threshold is None):
        raise ValueError("pass either heads={layer: [...]} or threshold=... with fractions=[[...], ...]")
    if heads is not None:
        if fractions is not None:
            raise ValueError("fractions is only used together with threshold")
        chosen = {int(layer): sorted({int(h) for h in hs}) for layer, hs in heads.items()}
        for layer, hs in chosen.items():
            routed = config.routed_heads[layer] if 0 <= layer < config.num_hidden_layers else []
            stray = [h for h in hs if h not in routed]
            if stray:
                raise ValueError(f"layer {layer} has no routed heads {stray} (routed: {routed})")
    else:
        if fractions is None:
            raise ValueError(
                "threshold needs fractions: the routed fraction of every head of each global layer"
            )
        table = torch.as_tensor(fractions, dtype=torch.float64)
        if table.shape != (len(current), config.num_attention_heads):
            raise ValueError(
                f"fractions must have shape (global layers, heads) = ({len(current)}, "
                f"{config.num_attention_heads}), got {tuple(table.shape)}"
            )
        chosen = {
            layer: [h for h in config.routed_heads[layer] if table[row, h] < threshold]
            for row, layer in enumerate(current)
        }
    chosen = {layer: hs for layer, hs in chosen.items() if hs}
    emptied = []
    for layer, hs in chosen.items():
        keep = [h for h in config.routed_heads[layer] if h not in hs]
        if not keep:
            emptied.append(layer)
            continue
        router = base.layers[layer].router
        rows = [router.heads.index(h) for h in keep]
        new = type(router)(
            config.hidden_size,
            config.num_attention_heads,
            keep,
            temperature=router.temperature,
            threshold=router.threshold,
            offset=router.offset,
        ).to(device=router.weight.device, dtype=router.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(router.weight[rows])
        new.train(router.training)
        base.layers[layer].router = new
        config.routed_heads[layer] = keep
    if emptied:
        prune_global_layers(model, emptied)
    return dict(sorted(chosen.items()))
