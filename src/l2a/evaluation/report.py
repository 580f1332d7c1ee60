"""Results of an evaluation run and their report: ``results.json``, ``results.md`` and PNG plots."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from l2a.evaluation.common import format_length
from l2a.evaluation.perplexity import PerplexityReport
from l2a.evaluation.routing import RoutingExample, RoutingReport
from l2a.evaluation.speed import SpeedReport
from l2a.evaluation.tasks import TaskResult


@dataclass
class ModelEvaluation:
    """Everything measured for one model (or one routing variant of an L2A model)."""

    label: str
    info: dict[str, Any] = field(default_factory=dict)
    tasks: list[TaskResult] = field(default_factory=list)
    perplexity: list[PerplexityReport] = field(default_factory=list)
    routing: RoutingReport | None = None
    speed: SpeedReport | None = None

    @property
    def task_sparsity(self) -> float | None:
        """1 − mean routed fraction of prompt tokens during the task prefills (None without routing)."""
        fractions = [x for r in self.tasks if r.router_fraction for x in r.router_fraction]
        return None if not fractions else 1.0 - sum(fractions) / len(fractions)

    def score(self, task: str, length: int) -> float | None:
        for result in self.tasks:
            if result.task == task and result.length == length:
                return result.score
        return None

    def mean_score(self, length: int) -> float | None:
        scores = [r.score for r in self.tasks if r.length == length]
        return sum(scores) / len(scores) if scores else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "info": self.info,
            "task_sparsity": self.task_sparsity,
            "tasks": [r.to_dict() for r in self.tasks],
            "perplexity": [p.to_dict() for p in self.perplexity],
            "routing": self.routing.to_dict() if self.routing else None,
            "speed": self.speed.to_dict() if self.speed else None,
        }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def _finite(value: Any) -> Any:
    """NaN / inf → None, so that ``results.json`` is strict JSON (e.g. decode speed with decode_tokens=0)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "model"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _tasks_and_lengths(results: Sequence[ModelEvaluation]) -> tuple[list[str], list[int]]:
    tasks = list(dict.fromkeys(r.task for m in results for r in m.tasks))
    lengths = sorted({r.length for m in results for r in m.tasks})
    return tasks, lengths


def distance_buckets(results: Sequence[ModelEvaluation]) -> dict[str, dict[int, list[float]]]:
    """Sample scores grouped by needle distance in powers of two: label → {k: scores with
    2^k <= distance < 2^(k+1)} (k = 0 also holds distance 0)."""
    grouped: dict[str, dict[int, list[float]]] = {}
    for m in results:
        for result in m.tasks:
            for sample in result.samples:
                if sample.needle_distance is not None:
                    k = max(sample.needle_distance, 1).bit_length() - 1
                    grouped.setdefault(m.label, {}).setdefault(k, []).append(sample.score)
    return grouped


def _distance_table(results: Sequence[ModelEvaluation]) -> list[str]:
    grouped = distance_buckets(results)
    if not grouped:
        return []
    ks = sorted({k for buckets in grouped.values() for k in buckets})
    windows = {m.info["sliding_window"] for m in results if "sliding_window" in m.info}
    note = f" Sliding window: {', '.join(map(str, sorted(windows)))} tokens." if windows else ""
    lines = [
        "## Score by needle distance (all needle tasks and lengths; score, samples)",
        "",
        f"Distance: tokens from the end of the earliest needle to the end of the prompt.{note}",
        "",
    ]
    header = ["model", *(f"[{1 << k}, {1 << (k + 1)})" if k else "[0, 2)" for k in ks)]
    rows = []
    for m in results:
        buckets = grouped.get(m.label, {})
        cells = [
            f"{sum(buckets[k]) / len(buckets[k]):.1f} ({len(buckets[k])})" if k in buckets else "–"
            for k in ks
        ]
        rows.append([m.label, *cells])
    return lines + _table(header, rows) + [""]


def markdown_report(results: Sequence[ModelEvaluation], settings: dict[str, Any] | None = None) -> str:
    """The comparison as markdown: mean task score by length (like the papers' RULER tables) with sparsity,
    per-task scores, perplexity by position, routing and speed/memory."""
    lines = ["# Evaluation results", ""]
    if settings:
        lines += ["Settings: " + ", ".join(f"{key} `{value}`" for key, value in settings.items()), ""]
    tasks, lengths = _tasks_and_lengths(results)
    if tasks:
        lines += ["## Task score (mean over tasks, 0–100)", ""]
        header = ["model", *(format_length(n) for n in lengths), "avg", "sparsity %"]
        rows = []
        for m in results:
            means = [m.mean_score(n) for n in lengths]
            valid = [x for x in means if x is not None]
            sparsity = m.task_sparsity
            rows.append(
                [
                    m.label,
                    *(_fmt(x) for x in means),
                    _fmt(sum(valid) / len(valid) if valid else None),
                    _fmt(None if sparsity is None else 100 * sparsity),
                ]
            )
        lines += _table(header, rows) + ["", f"Tasks: {', '.join(tasks)}.", "", "## Score by task", ""]
        rows = [
            [m.label, task, *(_fmt(m.score(task, n)) for n in lengths)] for m in results for task in tasks
        ]
        lines += _table(["model", "task", *(format_length(n) for n in lengths)], rows) + [""]
    lines += _distance_table(results)
    seq_lens = sorted({r.seq_len for m in results for r in m.perplexity})
    for seq_len in seq_lens:
        reports = [(m.label, r) for m in results for r in m.perplexity if r.seq_len == seq_len]
        edges = reports[0][1].edges
        if any(r.edges != edges for _, r in reports):
            raise ValueError(f"perplexity reports at N={seq_len} use different bucket edges")
        lines += [
            f"## Loss by position, N={format_length(seq_len)} (mean NLL in nats/token; last row: perplexity)",
            "",
        ]
        header = ["positions", *(f"{label} ({r.num_sequences} windows)" for label, r in reports)]
        rows = [
            [f"[{a}, {b})", *(_fmt(r.nll[i], 4) for _, r in reports)]
            for i, (a, b) in enumerate(zip(edges, edges[1:]))
        ]
        rows.append(["all: PPL", *(_fmt(r.overall_ppl, 3) for _, r in reports)])
        lines += _table(header, rows) + [""]
    routed = [m for m in results if m.routing is not None]
    if routed:
        lines += ["## Routing (fraction of tokens sent to global attention, mean over layers)", ""]
        rows = []
        for m in routed:
            r = m.routing
            mean = lambda xs: None if xs is None else sum(xs) / len(xs)
            rows.append(
                [
                    m.label,
                    _fmt(None if r.mean_sparsity is None else 100 * r.mean_sparsity),
                    _fmt(mean(r.task_fraction), 3),
                    _fmt(mean(r.needle_fraction), 3),
                    _fmt(mean(r.haystack_fraction), 3),
                    _fmt(mean(r.text_fraction), 3),
                ]
            )
        lines += _table(["model", "sparsity %", "task tokens", "needle", "haystack", "text"], rows) + [""]
        for m in routed:
            fraction = m.routing.task_fraction or m.routing.text_fraction
            per_layer = ", ".join(f"{layer}: {x:.3f}" for layer, x in zip(m.routing.layers, fraction))
            lines += [f"Per layer ({m.label}): {per_layer}", ""]
            if m.routing.head_fraction is not None:
                lines += [f"Per head ({m.label}; layer: fraction of tokens on full attention per head):", ""]
                lines += [
                    f"- {layer}: " + " ".join(f"{x:.3f}" for x in heads)
                    for layer, heads in zip(m.routing.layers, m.routing.head_fraction)
                ] + [""]
    timed = [m for m in results if m.speed is not None]
    if timed:
        first = timed[0].speed
        env = ", ".join(f"{k} {v}" for k, v in first.environment.items())
        lines += [
            "## Speed and memory",
            "",
            f"Device {first.device} ({env}), {first.dtype}, batch {first.batch_size}, "
            f"median of {first.repeats} runs, decode {first.decode_tokens} tokens after the prefill. "
            f"Peak memory: {first.memory_measure}.",
            "",
        ]
        header = [
            "model",
            "N",
            "prefill ms (TTFT)",
            "TTFT speed-up",
            "prefill tok/s",
            "decode tok/s",
            "KV cache MiB",
            "peak MiB",
        ]
        rows = []
        for m in timed:
            dense = _dense_reference(m, timed)
            for p in m.speed.points:
                ref = next((q for q in dense.speed.points if q.length == p.length), None) if dense else None
                rows.append(
                    [
                        m.label,
                        format_length(p.length),
                        _fmt(p.prefill_ms, 2),
                        "–" if ref is None else f"{ref.prefill_ms / p.prefill_ms:.2f}×",
                        _fmt(p.prefill_tokens_per_s, 0),
                        _fmt(p.decode_tokens_per_s, 1),
                        _mib(p.kv_cache_bytes),
                        _mib(p.peak_memory_bytes),
                    ]
                )
        lines += _table(header, rows)
        lines += [
            "",
            "TTFT speed-up: prefill time of the same checkpoint's all_global variant (dense reference) "
            "divided by this model's.",
            "",
        ]
    return "\n".join(lines)


def _dense_reference(model: ModelEvaluation, candidates: Sequence[ModelEvaluation]) -> ModelEvaluation | None:
    """The all_global variant of the same checkpoint, if it was timed too."""
    path = model.info.get("path")
    for other in candidates:
        if path is not None and other.info.get("path") == path and other.info.get("variant") == "all_global":
            return other
    return None


def _figure(width: float = 6.0, height: float = 4.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_scores_vs_length(results: Sequence[ModelEvaluation], path: Path) -> None:
    """Mean task score against prompt length, one line per model."""
    _, lengths = _tasks_and_lengths(results)
    fig = _figure()
    ax = fig.add_subplot()
    for m in results:
        points = [(n, m.mean_score(n)) for n in lengths if m.mean_score(n) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=m.label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [format_length(n) for n in lengths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("mean task score")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)


def plot_task_heatmap(model: ModelEvaluation, path: Path) -> None:
    """Task × length score heatmap of one model."""
    tasks, lengths = _tasks_and_lengths([model])
    grid = [[model.score(t, n) for n in lengths] for t in tasks]
    values = [[float("nan") if x is None else x for x in row] for row in grid]
    fig = _figure(1.5 + 0.9 * len(lengths), 1.2 + 0.45 * len(tasks))
    ax = fig.add_subplot()
    image = ax.imshow(values, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
    ax.set_yticks(range(len(tasks)), tasks)
    for i, row in enumerate(grid):
        for j, x in enumerate(row):
            ax.text(j, i, _fmt(x, 0), ha="center", va="center", fontsize=8)
    ax.set_title(model.label)
    fig.colorbar(image, ax=ax, label="score")
    fig.savefig(path, dpi=120)


def plot_perplexity(results: Sequence[ModelEvaluation], path: Path) -> None:
    """Loss by position bucket (bucket midpoints on a log axis), one line per model and window length."""
    fig = _figure()
    ax = fig.add_subplot()
    for m in results:
        for r in m.perplexity:
            mids = [math.sqrt(a * max(b - 1, a)) for a, b in zip(r.edges, r.edges[1:])]
            label = m.label if len(m.perplexity) == 1 else f"{m.label} N={format_length(r.seq_len)}"
            ax.plot(mids, r.nll, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position (tokens of context)")
    ax.set_ylabel("mean NLL (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)


def plot_routing(example: RoutingExample, path: Path, title: str = "", max_columns: int = 1200) -> None:
    """Routed positions per layer over one prompt (dark = routed to global attention), with a strip below
    marking the needle spans in red. Prompts longer than ``max_columns`` tokens are shown in bins of
    consecutive tokens, dark when any of its tokens was routed (so single routed tokens stay visible)."""
    decisions = example.decisions.float()
    n = decisions.shape[1]
    needles = torch.zeros(n)
    for start, end in example.needle_spans:
        needles[start:end] = 1.0
    width = max(1, math.ceil(n / max_columns))
    if width > 1:
        pad = width * math.ceil(n / width) - n
        decisions = (
            torch.nn.functional.pad(decisions, (0, pad)).reshape(decisions.shape[0], -1, width).amax(-1)
        )
        needles = torch.nn.functional.pad(needles, (0, pad)).reshape(-1, width).amax(-1)
    fig = _figure(10.0, 1.8 + 0.22 * len(example.layers))
    grid = fig.add_gridspec(2, 1, height_ratios=[max(len(example.layers), 2), 1])
    ax = fig.add_subplot(grid[0])
    extent = (0, n, -0.5, len(example.layers) - 0.5)
    ax.imshow(
        decisions.numpy(),
        aspect="auto",
        cmap="Greys",
        vmin=0,
        vmax=1,
        interpolation="nearest",
        extent=extent,
        origin="lower",
    )
    ax.set_yticks(range(len(example.layers)), [str(layer) for layer in example.layers])
    ax.set_ylabel("layer")
    ax.tick_params(labelbottom=False)
    ax.set_title(title or f"routed tokens ({example.task})")
    strip = fig.add_subplot(grid[1], sharex=ax)
    strip.imshow(
        needles[None].numpy(),
        aspect="auto",
        cmap="Reds",
        vmin=0,
        vmax=1,
        interpolation="nearest",
        extent=(0, n, 0, 1),
    )
    strip.set_yticks([])
    strip.set_ylabel("needle", rotation=0, ha="right", va="center")
    binned = f" (bins of {width} tokens: dark if any token routed)" if width > 1 else ""
    strip.set_xlabel(f"token position{binned}")
    strip.set_xlim(0, n)
    fig.savefig(path, dpi=120)


def plot_head_routing(report: RoutingReport, path: Path, title: str = "") -> None:
    """Heat map of the fraction of tokens for which each (layer, query head) used full attention
    (head-wise routers, AHA), with the value written in each cell."""
    table = torch.tensor(report.head_fraction, dtype=torch.float64)
    layers, heads = table.shape
    fig = _figure(max(4.0, 1.0 + 0.45 * heads), max(2.5, 1.2 + 0.4 * layers))
    ax = fig.add_subplot()
    image = ax.imshow(table.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto", origin="lower")
    if layers * heads <= 400:
        for i in range(layers):
            for j in range(heads):
                value = float(table[i, j])
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if value > 0.6 else "white",
                )
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers), [str(layer) for layer in report.layers])
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    mean = float(table.mean())
    ax.set_title(title or f"full-attention fraction per head (mean {mean:.3f})", fontsize=9)
    fig.colorbar(image, ax=ax, label="fraction of tokens on full attention")
    fig.savefig(path, dpi=120)


def write_report(
    results: Sequence[ModelEvaluation], out_dir: str | Path, settings: dict[str, Any] | None = None
) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and the plots into ``out_dir``; returns the paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = [m.label for m in results]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be unique, got {labels}")
    written = {"json": out / "results.json", "markdown": out / "results.md"}
    payload = _finite({"settings": settings or {}, "models": [m.to_dict() for m in results]})
    written["json"].write_text(json.dumps(payload, indent=2, default=str, allow_nan=False) + "\n")
    written["markdown"].write_text(markdown_report(results, settings) + "\n")
    if any(m.tasks for m in results):
        written["scores_vs_length"] = out / "scores_vs_length.png"
        plot_scores_vs_length(results, written["scores_vs_length"])
        for m in results:
            if m.tasks:
                written[f"heatmap:{m.label}"] = out / f"heatmap_{_slug(m.label)}.png"
                plot_task_heatmap(m, written[f"heatmap:{m.label}"])
    if any(m.perplexity for m in results):
        written["perplexity"] = out / "perplexity_by_position.png"
        plot_perplexity(results, written["perplexity"])
    for m in results:
        if m.routing is not None and m.routing.example is not None:
            written[f"routing:{m.label}"] = out / f"routing_{_slug(m.label)}.png"
            plot_routing(
                m.routing.example,
                written[f"routing:{m.label}"],
                f"routed tokens: {m.label} ({m.routing.example.task})",
            )
        if m.routing is not None and m.routing.head_fraction is not None:
            written[f"head_routing:{m.label}"] = out / f"head_routing_{_slug(m.label)}.png"
            plot_head_routing(
                m.routing, written[f"head_routing:{m.label}"], f"full attention per head: {m.label}"
            )
    return written
