"""Routing analysis: which tokens an L2A model sends to global attention, per layer (and, for AHA's
head-wise routers, per layer and query head).

The model reports only per-layer fractions (`router_fraction`); per-token decisions are read here with
forward hooks on its ``router`` submodules. A router returns a `l2a.layers.router.RoutingDecision`
(whose ``hard`` field is the decision) or, for other router implementations, the bare logit, turned into
the decision by the inference rule
``sigmoid((logit + router_logit_offset) / router_temperature) >= router_threshold``.
For head-wise decisions (B, N, H) the per-layer fractions count (token, head) pairs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from l2a.data.tasks import TaskSample
from l2a.data.tokenization import encode
from l2a.evaluation.common import is_l2a_model, model_device

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def router_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The ``router`` submodules by decoder-layer index (sorted): ``model.layers.3.router`` → 3."""
    found: dict[int, torch.nn.Module] = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] != "router":
            continue
        match = _LAYER_INDEX.search(name)
        if match is None:
            raise ValueError(f"router module {name!r} is not inside a numbered decoder layer (layers.<i>)")
        found[int(match.group(1))] = module
    return dict(sorted(found.items()))


def _hard_decision(
    output: Any, layer: int, temperature: float, threshold: float, offset: float = 0.0
) -> torch.Tensor:
    """Bool (B, N) token-wise or (B, N, H) head-wise decision from a router output: a `RoutingDecision`
    (its ``hard`` field, which already includes ``force_route``) or a bare logit tensor (B, N[, H])
    thresholded by the inference rule."""
    hard = getattr(output, "hard", None)
    if hard is None:
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"router of layer {layer} returned {type(output).__name__}; expected a decision or logits"
            )
        logits = output.float().reshape(output.shape[0], output.shape[1], -1)
        hard = torch.sigmoid((logits + offset) / temperature) >= threshold
    hard = hard.reshape(hard.shape[0], hard.shape[1], -1).detach().bool()
    return hard[..., 0] if hard.shape[-1] == 1 else hard


@contextmanager
def capture_routing(model: torch.nn.Module) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Record the per-token decisions of every forward while the context is open:
    layer index → list of bool (B, N) (or head-wise (B, N, H)) tensors, one per router call."""
    routers = router_modules(model)
    if not routers:
        raise ValueError(
            f"{type(model).__name__} has no `router` submodules; routing analysis needs an L2A model"
        )
    config = model.config
    captured: dict[int, list[torch.Tensor]] = {layer: [] for layer in routers}
    handles = []
    for layer, module in routers.items():

        def hook(module: torch.nn.Module, args: tuple, output: Any, layer: int = layer) -> None:
            decision = _hard_decision(
                output,
                layer,
                config.router_temperature,
                config.router_threshold,
                getattr(config, "router_logit_offset", 0.0),
            )
            captured[layer].append(decision)

        handles.append(module.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def routing_decisions(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """Per-token routing decisions of one forward pass (with ``config.force_route`` applied, if set).

    Args:
        model: an L2A model.
        input_ids: (B, N).

    Returns:
        (layer indices, decisions bool (B, L, N) on CPU, or (B, L, N, H) for head-wise routers) where L is
        the number of layers with a router.
    """
    with capture_routing(model) as captured:
        model(input_ids=input_ids.to(model_device(model)), use_cache=False, logits_to_keep=1)
    layers = list(captured)
    missing = [layer for layer in layers if len(captured[layer]) != 1]
    if missing:
        raise RuntimeError(f"expected one router call per layer in one forward; layers {missing} differ")
    return layers, torch.stack([captured[layer][0] for layer in layers], dim=1).cpu()


@dataclass
class RoutingExample:
    """Decisions over one prompt, kept for plotting: bool (L, N) (head-wise routers: the fraction of heads
    routed, float (L, N)); needle spans as [start, end) tokens."""

    task: str
    layers: list[int]
    decisions: torch.Tensor
    needle_spans: list[tuple[int, int]]


@dataclass
class RoutingReport:
    """Fraction of tokens routed to global attention per layer (order as ``layers``); sparsity = 1 − it.

    ``task_fraction``: over all task-prompt tokens; ``needle_fraction`` / ``haystack_fraction``: over tokens
    inside / outside the samples' needle spans; ``per_task``: task → per-layer fraction; ``text_fraction``:
    over the given texts. ``head_fraction`` (head-wise routers): [layer][head] fraction of the analysed
    tokens (task prompts and texts together) for which that query head used full attention.
    """

    layers: list[int]
    task_fraction: list[float] | None = None
    needle_fraction: list[float] | None = None
    haystack_fraction: list[float] | None = None
    per_task: dict[str, list[float]] = field(default_factory=dict)
    text_fraction: list[float] | None = None
    num_task_tokens: int = 0
    num_needle_tokens: int = 0
    num_text_tokens: int = 0
    head_fraction: list[list[float]] | None = None
    example: RoutingExample | None = None

    @property
    def mean_sparsity(self) -> float | None:
        """1 − mean routed fraction over layers (task prompts if any, else texts)."""
        fraction = self.task_fraction if self.task_fraction is not None else self.text_fraction
        return None if fraction is None else 1.0 - sum(fraction) / len(fraction)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "mean_sparsity": self.mean_sparsity,
            "task_fraction": self.task_fraction,
            "needle_fraction": self.needle_fraction,
            "haystack_fraction": self.haystack_fraction,
            "per_task": self.per_task,
            "text_fraction": self.text_fraction,
            "num_task_tokens": self.num_task_tokens,
            "num_needle_tokens": self.num_needle_tokens,
            "num_text_tokens": self.num_text_tokens,
            "head_fraction": self.head_fraction,
        }


def needle_mask(length: int, spans: Sequence[Sequence[int]]) -> torch.Tensor:
    """Bool (N,) mask of the tokens inside the [start, end) spans."""
    mask = torch.zeros(length, dtype=torch.bool)
    for start, end in spans:
        if not 0 <= start <= end <= length:
            raise ValueError(f"needle span ({start}, {end}) outside a prompt of {length} tokens")
        mask[start:end] = True
    return mask


def _fraction(routed: torch.Tensor, count: int) -> list[float] | None:
    return None if count == 0 else (routed.double() / count).tolist()


def routing_analysis(
    model: torch.nn.Module,
    tokenizer: Any,
    samples: Sequence[TaskSample] = (),
    *,
    texts: Sequence[str] = (),
    text_len: int | None = None,
    progress: bool = False,
) -> RoutingReport:
    """Per-layer routed fractions on task prompts (split into needle and haystack tokens) and on texts.

    Args:
        model: L2A model with learned routing.
        tokenizer: encodes ``texts``.
        samples: task samples (`l2a.data.tasks.TaskSample`); the first one with needle spans (else the
            first) is kept in ``RoutingReport.example`` for `l2a.evaluation.report.plot_routing`.
        texts: documents, each truncated to ``text_len`` tokens when given.
    """
    if not is_l2a_model(model):
        raise ValueError(f"routing analysis needs an L2A model, got model_type={model.config.model_type!r}")
    if not samples and not texts:
        raise ValueError("routing_analysis needs task samples or texts")
    layers = list(router_modules(model))
    report = RoutingReport(layers=layers)
    # float64: head-wise decisions add fractions of heads per token
    routed = torch.zeros(len(layers), dtype=torch.float64)
    needle_routed = torch.zeros(len(layers), dtype=torch.float64)
    task_routed: dict[str, torch.Tensor] = {}
    task_tokens: dict[str, int] = {}
    head_routed: list[torch.Tensor] = []  # head-wise: Σ over tokens of the (L, H) decisions

    def per_token(decisions: torch.Tensor) -> torch.Tensor:
        """(L, N) bool, or (L, N, H) head-wise -> (L, N) fraction routed (and the head sums recorded)."""
        if decisions.dim() == 2:
            return decisions
        head_routed.append(decisions.double().sum(1))
        return decisions.double().mean(-1)

    for sample in tqdm(samples, desc="routing", disable=not progress, leave=False):
        ids = torch.as_tensor(sample.input_ids, dtype=torch.long).unsqueeze(0)
        _, decisions = routing_decisions(model, ids)
        decisions = per_token(decisions[0])
        spans = [(int(a), int(b)) for a, b in (sample.needle_spans or [])]
        mask = needle_mask(ids.shape[1], spans)
        routed += decisions.sum(1)
        needle_routed += decisions[:, mask].sum(1)
        report.num_task_tokens += ids.shape[1]
        report.num_needle_tokens += int(mask.sum())
        task_routed[sample.task] = task_routed.get(sample.task, 0) + decisions.sum(1)
        task_tokens[sample.task] = task_tokens.get(sample.task, 0) + ids.shape[1]
        if report.example is None or (spans and not report.example.needle_spans):
            report.example = RoutingExample(sample.task, layers, decisions, spans)
    if samples:
        report.task_fraction = _fraction(routed, report.num_task_tokens)
        report.needle_fraction = _fraction(needle_routed, report.num_needle_tokens)
        report.haystack_fraction = _fraction(
            routed - needle_routed, report.num_task_tokens - report.num_needle_tokens
        )
        report.per_task = {name: _fraction(task_routed[name], task_tokens[name]) for name in task_routed}
    text_routed = torch.zeros(len(layers), dtype=torch.float64)
    for text in texts:
        ids = torch.tensor(encode(tokenizer, text), dtype=torch.long)[:text_len].unsqueeze(0)
        if ids.shape[1] == 0:
            continue
        text_routed += per_token(routing_decisions(model, ids)[1][0]).sum(1)
        report.num_text_tokens += ids.shape[1]
    if texts:
        report.text_fraction = _fraction(text_routed, report.num_text_tokens)
    if head_routed:
        report.head_fraction = _fraction(
            torch.stack(head_routed).sum(0), report.num_task_tokens + report.num_text_tokens
        )
    return report
