"""The report of a reproduction run: ``results.json``, ``report.md``, PNG plots and the targets' pass/fail.

Works on a partial run: arms whose stage has not run are listed as pending and their targets are
"pending" (neither pass nor fail).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from l2a.experiments.config import ReproductionConfig
from l2a.experiments.stages import ARMS


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def collect_rows(run: Any, config: ReproductionConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(score rows of the base and of every finished arm incl. pruned ones, pruning summary rows)."""
    rows: list[dict[str, Any]] = []
    pruning: list[dict[str, Any]] = []
    if run.done("pretrain"):
        rows += run.record("pretrain")["result"]["rows"]
    for arm in config.extend.arms:
        if not run.done(arm):
            continue
        result = run.record(arm)["result"]
        rows += result["rows"]
        for entry in result.get("pruning", []):
            rows += entry["rows"]
            summary = {k: v for k, v in entry.items() if k not in ("rows", "perplexity")}
            long_rows = [r for r in entry["rows"] if r["length"] == config.long_length]
            summary["score"] = _mean([r["score"] for r in long_rows])
            summary["length"] = config.long_length
            pruning.append(summary)
    return rows, pruning


def mean_score(
    rows: list[dict[str, Any]], arm: str, length: int, key: str = "score", **match: Any
) -> float | None:
    """Mean over tasks of ``key`` for one arm and length (rows matching ``match`` too)."""
    chosen = [
        r[key]
        for r in rows
        if r["arm"] == arm and r["length"] == length and all(r.get(k) == v for k, v in match.items())
    ]
    return _mean(chosen)


def check_targets(
    rows: list[dict[str, Any]], pruning: list[dict[str, Any]], config: ReproductionConfig
) -> list[dict[str, Any]]:
    """The targets of issue 13 at factor · L: each ``{"target", "passed", "detail"}``; ``passed`` is None
    when the target cannot be judged yet (an arm pending) or at all (the reference scores 0)."""
    t, long = config.targets, config.long_length
    clp, l2a = mean_score(rows, "clp", long), mean_score(rows, "l2a", long)
    l2a_sparsity = mean_score(rows, "l2a", long, key="sparsity")
    out = []

    def add(target: str, passed: bool | None, detail: str) -> None:
        out.append({"target": target, "passed": passed, "detail": detail})

    if clp is None or l2a is None:
        add("l2a_within_gap_of_clp", None, "pending: the clp and l2a arms must both have run")
    elif clp <= 0.0:
        add("l2a_within_gap_of_clp", None, "not measurable: clp scores 0 at the extension length")
    else:
        floor = clp * (1 - t.l2a_relative_gap)
        add(
            "l2a_within_gap_of_clp",
            l2a >= floor and (l2a_sparsity or 0.0) >= t.l2a_min_sparsity,
            f"l2a {l2a:.1f} vs clp {clp:.1f} (needs >= {floor:.1f}), sparsity {l2a_sparsity:.3f} "
            f"(needs >= {t.l2a_min_sparsity})",
        )
    clp_far = mean_score(rows, "clp", long, key="beyond_window_score")
    for arm in ("swa", "random"):
        far = mean_score(rows, arm, long, key="beyond_window_score")
        if arm not in config.extend.arms:
            continue
        if far is None or clp_far is None:
            add(f"{arm}_below_clp_beyond_window", None, "pending (or no beyond-window samples)")
            continue
        add(
            f"{arm}_below_clp_beyond_window",
            far <= clp_far - t.baseline_gap_points,
            f"{arm} {far:.1f} vs clp {clp_far:.1f} on beyond-window samples (needs <= clp - "
            f"{t.baseline_gap_points:g})",
        )
    half = [
        p for p in pruning if p["prune_fraction"] == max((q["prune_fraction"] for q in pruning), default=0)
    ]
    if not half or l2a is None:
        add("pruning_costs_at_most", None, "pending: the l2a arm must have run with prune.fractions")
    elif l2a <= 0.0:
        add("pruning_costs_at_most", None, "not measurable: l2a scores 0 at the extension length")
    else:
        p = half[0]
        cost = l2a - p["score"]
        saved = 1 - p["kv_bytes"] / p["kv_bytes_unpruned"]
        add(
            "pruning_costs_at_most",
            cost <= t.prune_max_cost_points,
            f"pruning layers {p['pruned_layers']} costs {cost:.1f} points "
            f"(needs <= {t.prune_max_cost_points:g}); "
            f"KV cache {p['kv_bytes_unpruned']} -> {p['kv_bytes']} bytes at {p['kv_length']} tokens "
            f"({saved:.0%} saved)",
        )
    return out


def _plot_scores(path: Path, rows: list[dict[str, Any]], config: ReproductionConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    lengths = config.eval_lengths
    for arm, style in (("clp", "s-"), ("l2a", "o-"), ("swa", "^-"), ("random", "v-"), ("l2a_pruned", "x--")):
        arm_rows = [r for r in rows if r["arm"] == arm]
        if not arm_rows:
            continue
        if arm == "l2a_pruned":
            frac = max(r["prune_fraction"] for r in arm_rows)
            arm_rows = [r for r in arm_rows if r["prune_fraction"] == frac]
        ys = [_mean([r["score"] for r in arm_rows if r["length"] == n]) for n in lengths]
        ax.plot(lengths, ys, style, label=arm)
    base = mean_score(rows, "base", config.data.seq_len)
    if base is not None:
        ax.plot([config.data.seq_len], [base], "k*", ms=10, label="base (dense, at L)")
    ax.axvline(config.long_length, color="gray", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_ylim(-2, 102)
    ax.set_xlabel("length (tokens); dotted: the extension length")
    ax.set_ylabel("mean score over tasks")
    ax.legend(fontsize=8)
    ax.set_title(config.name)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_sparsity(path: Path, l2a: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    routed = l2a["routed_fraction_long"]
    layers = list(range(len(routed)))
    routing = l2a.get("routing") or {}
    names = routing.get("layers", layers)
    width = 0.28
    ax.bar([i - width for i in layers], [1 - f for f in routed], width, label="sparsity (eval prompts)")
    if routing.get("needle_fraction"):
        ax.bar(layers, routing["needle_fraction"], width, label="routed: needle tokens")
    if routing.get("haystack_fraction"):
        ax.bar([i + width for i in layers], routing["haystack_fraction"], width, label="routed: haystack")
    ax.set_xticks(layers, [str(n) for n in names])
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of tokens")
    ax.legend(fontsize=8)
    ax.set_title("L2A routing per layer at the extension length")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _table(rows: list[dict[str, Any]], arms: list[str], lengths: list[int], tasks: list[str]) -> list[str]:
    lines = ["| arm | task | " + " | ".join(str(n) for n in lengths) + " |"]
    lines.append("|---|---|" + "---|" * len(lengths))
    for arm in arms:
        for task in [*tasks, "mean"]:
            cells = []
            for n in lengths:
                chosen = [r["score"] for r in rows if r["arm"] == arm and r["length"] == n]
                if task != "mean":
                    chosen = [
                        r["score"] for r in rows if r["arm"] == arm and r["length"] == n and r["task"] == task
                    ]
                value = _mean(chosen)
                cells.append("–" if value is None else f"{value:.1f}")
            if any(c != "–" for c in cells):
                lines.append(f"| {arm} | {task} | " + " | ".join(cells) + " |")
    return lines


def environment() -> dict[str, Any]:
    """Device and versions recorded with the results."""
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_count": __import__("os").cpu_count(),
    }


def write_reproduction_report(root: Path, config: ReproductionConfig, run: Any) -> dict[str, Any]:
    """Write ``results.json``, ``report.md``, ``scores.png`` and (after the l2a arm) ``sparsity.png``;
    returns the targets and the pending arms. The targets are also printed."""
    rows, pruning = collect_rows(run, config)
    targets = check_targets(rows, pruning, config)
    pending = [arm for arm in config.extend.arms if not run.done(arm)]
    stages = {s: run.record(s) for s in ("pretrain", *ARMS) if run.done(s)}
    perplexity = []
    for record in stages.values():
        result = record["result"]
        perplexity.append(result["perplexity"])
        perplexity += [p["perplexity"] for p in result.get("pruning", [])]
    summary = {
        "config": config.to_dict(),
        "fingerprint": config.fingerprint(),
        # where each stage ran (None: recorded before stages kept it) and where this report was written
        "environment": next((r["environment"] for r in stages.values() if r.get("environment")), None),
        "stage_environment": {name: record.get("environment") for name, record in stages.items()},
        "report_environment": environment(),
        "pending_arms": pending,
        "stage_seconds": {name: record["seconds"] for name, record in stages.items()},
        "pretrain": {k: v for k, v in stages["pretrain"]["result"].items() if k not in ("rows", "perplexity")}
        if "pretrain" in stages
        else None,
        "rows": rows + pruning,
        "perplexity": perplexity,
        "routing": {arm: stages[arm]["result"].get("routing") for arm in ("l2a", "random") if arm in stages},
        "targets": targets,
    }
    (root / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    _plot_scores(root / "scores.png", rows, config)
    if "l2a" in stages:
        _plot_sparsity(root / "sparsity.png", stages["l2a"]["result"])

    lengths, tasks = config.eval_lengths, config.eval_tasks
    arms = [
        "base",
        *[a for a in config.extend.arms if a not in pending],
        *(["l2a_pruned"] if pruning else []),
    ]
    lines = [f"# Reproduction report: {config.name}", ""]
    env = summary["environment"]
    where = (
        f"Device {env['device']}, torch {env['torch']}, transformers {env['transformers']}"
        if env
        else "Device not recorded by the stages"
    )
    lines.append(f"{where}, seed {config.seed}, config fingerprint {summary['fingerprint']}.")
    if pending:
        lines.append(f"**Pending arms (not run yet): {', '.join(pending)}.**")
    if summary["pretrain"]:
        pre = summary["pretrain"]
        lines.append(
            f"Base: {pre['parameters'] / 1e6:.2f}M parameters, {pre['steps']} pretraining steps "
            f"(stopped early: {pre['stopped_early']}); dense score at L={config.data.seq_len}: "
            f"{mean_score(rows, 'base', config.data.seq_len):.1f}."
        )
    lines += ["", "## Scores (teacher-forced, 0–100) by arm, task and length", ""]
    lines += _table(rows, arms, lengths, tasks)
    lines += ["", "## Sparsity (fraction of tokens skipping global attention) by length", ""]
    lines.append("| arm | " + " | ".join(str(n) for n in lengths) + " |")
    lines.append("|---|" + "---|" * len(lengths))
    for arm in arms:
        cells = [mean_score(rows, arm, n, key="sparsity") for n in lengths]
        lines.append(f"| {arm} | " + " | ".join("–" if c is None else f"{c:.3f}" for c in cells) + " |")
    if pruning:
        lines += ["", "## Pruning", "", "| pruned layers | score at 4L | KV bytes | KV bytes unpruned |"]
        lines.append("|---|---|---|---|")
        for p in pruning:
            lines.append(
                f"| {p['pruned_layers']} | {p['score']:.1f} | {p['kv_bytes']} | {p['kv_bytes_unpruned']} |"
            )
    if "l2a" in stages:
        l2a = stages["l2a"]["result"]
        routing = l2a.get("routing") or {}
        layers = routing.get("layers") or list(range(len(l2a["routed_fraction_long"])))
        lines += ["", f"## L2A routing per layer at {config.long_length} tokens", ""]
        lines += [
            "| layer | sparsity | routed: needle tokens | routed: haystack tokens |",
            "|---|---|---|---|",
        ]
        for i, layer in enumerate(layers):
            needle = (routing.get("needle_fraction") or [None] * len(layers))[i]
            hay = (routing.get("haystack_fraction") or [None] * len(layers))[i]
            cells = ["–" if v is None else f"{v:.3f}" for v in (needle, hay)]
            lines.append(f"| {layer} | {1 - l2a['routed_fraction_long'][i]:.3f} | {cells[0]} | {cells[1]} |")
    lines += ["", "## Perplexity by position (held-out text, NLL per bucket)", ""]
    for entry in perplexity:
        lines.append(
            f"- {entry['arm']} (N={entry['seq_len']}): "
            + ", ".join(
                f"[{a},{b}) {v:.3f}" for a, b, v in zip(entry["edges"], entry["edges"][1:], entry["nll"])
            )
        )
    lines += ["", "## Targets (issue 13)", ""]
    for t in targets:
        state = {True: "PASS", False: "FAIL", None: "N/A"}[t["passed"]]
        lines.append(f"- **{state}** {t['target']}: {t['detail']}")
        print(f"target {t['target']}: {state} — {t['detail']}")
    lines += ["", "![scores](scores.png)"]
    if "l2a" in stages:
        lines.append("![sparsity](sparsity.png)")
    (root / "report.md").write_text("\n".join(lines) + "\n")
    return {"targets": targets, "pending_arms": pending}
