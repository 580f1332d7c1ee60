"""The embedded AHA demo (`l2a demo --method aha`): the L2A demo's tiny model and task, routed per head.

`run_aha_demo` reuses the pieces of `l2a.demo` and `l2a.demo_common` (tiny Qwen3 over the byte tokenizer,
standard-library text mixed with beyond-window ``kv_retrieval``, the embedded dense base or full-attention
pretraining) and then:

1. converts the model with `l2a.convert_model(..., method="aha")` (zero routers: every head on full
   attention);
2. trains attention, norms and routers with the L1 regulariser on the routers' soft outputs (λ ramp) and
   leakage steps (full attention for every head on a fraction of steps);
3. evaluates beyond-window retrieval for the learned routing, ``force_route="none"`` (window attention only)
   and ``force_route="all"`` (every head full), against the dense model before conversion, and measures the
   fraction of (token, head) pairs that used full attention, per layer and head;
4. judges the run: **valid** when the dense base learned the task (accuracy ≥ `MIN_BASE_ACCURACY` and at
   least `MIN_BASE_MARGIN` above window-only attention), **passed** when valid, the learned routing is
   within `MAX_ACCURACY_GAP` of the base and ≥ `MIN_LOCAL_FRACTION` of (token, head) pairs are local;
5. optionally (`curve_windows`) the long-tail curve: the same base converted at several windows W, routers
   trained briefly at each (`curve_steps`), fraction of (token, head) pairs routed against W;
6. writes ``report.json``, ``aha_routing.png`` (per-head heat map, accuracy by distance), ``long_tail.png``
   and the models ``model`` (AHA) and ``base`` (dense), with the byte tokenizer, for ``l2a eval``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from l2a.demo import DemoConfig
from l2a.demo_common import (
    accuracy_by_distance,
    batches,
    cpu_run_settings,
    kv_task_args,
    resolve_device,
    retrieval_hits,
    start_demo,
)

ROUTINGS = {"aha": None, "local_only": "none", "all_global": "all"}
"""Report key → `L2AConfig.force_route` of the evaluated routing."""

MIN_BASE_ACCURACY = 0.8
MIN_BASE_MARGIN = 0.3
MAX_ACCURACY_GAP = 0.05
MIN_LOCAL_FRACTION = 0.85


@dataclass
class AHADemoConfig(DemoConfig):
    """`l2a.demo.DemoConfig` with AHA's routed phase: λ weighs the L1 sum of the routers' soft outputs over
    the (token, head) pairs of a sequence. `curve_windows` (comma-separated, e.g. "4,8,16,32"; empty: no
    curve) are the windows of the long-tail curve, each with `curve_steps` routed steps from the same base."""

    window: int = 16
    routed_steps: int = 150
    routed_lr: float = 1e-3
    regularizer_weight: float = 3e-4
    curve_windows: str = ""
    curve_steps: int = 60

    def __post_init__(self) -> None:
        super().__post_init__()
        for w in self.windows():
            if not 1 <= w <= self.seq_len:
                raise ValueError(f"curve_windows: window {w} outside [1, seq_len={self.seq_len}]")

    def windows(self) -> list[int]:
        """The long-tail curve's windows, sorted."""
        try:
            return sorted({int(part) for part in self.curve_windows.split(",") if part.strip()})
        except ValueError:
            raise ValueError(
                f"curve_windows must be comma-separated integers, got {self.curve_windows!r}"
            ) from None

    @classmethod
    def quick(cls) -> AHADemoConfig:
        """A reduced run (tens of seconds) for tests: same pipeline, far fewer steps and samples."""
        return cls(
            pretrain_steps=30,
            routed_steps=20,
            task_pool=64,
            eval_samples=16,
            corpus_chars=100_000,
            curve_steps=5,
        )


def _routed_train_config(config: AHADemoConfig, out: Path, steps: int, common: dict[str, Any]):
    from l2a.training import TrainConfig

    return TrainConfig(
        output_dir=str(out),
        steps=steps,
        optim={"lr": config.routed_lr, "warmup_steps": min(10, steps)},
        router={
            "regularizer_weight": config.regularizer_weight,
            "regularizer_schedule": "linear",
            "regularizer_ramp_steps": max(1, int(config.ramp_fraction * steps)),
            "leakage_probability": config.leakage_probability,
        },
        **common,
    )


@torch.no_grad()
def head_fractions(model: torch.nn.Module, rows: list, batch_size: int) -> torch.Tensor:
    """Fraction of the rows' tokens on full attention per (global layer, query head): float64 (L, Hq)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = None
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            ids = torch.tensor([row.input_ids for row in chunk], device=device)
            part = model(input_ids=ids, logits_to_keep=1).router_head_fraction.double().cpu() * len(chunk)
            total = part if total is None else total + part
    finally:
        model.train(was_training)
    return total / len(rows)


def evaluate_aha_routings(model: torch.nn.Module, rows: list, batch_size: int) -> dict[str, Any]:
    """Retrieval hits and accuracy of an AHA model under each routing of `ROUTINGS`, with the fraction of
    (token, head) pairs on full attention (``routed_fraction``, per global layer) and per head."""
    saved = model.config.force_route
    results: dict[str, Any] = {}
    try:
        for name, force in ROUTINGS.items():
            model.config.force_route = force
            hits, routed = retrieval_hits(model, rows, batch_size)
            results[name] = {
                "hits": hits,
                "accuracy": sum(hits) / len(hits),
                "routed_fraction": routed,
                "head_fraction": head_fractions(model, rows, batch_size).tolist(),
            }
    finally:
        model.config.force_route = saved
    return results


def verdict(base_accuracy: float, accuracy: dict[str, float], local_fraction: float) -> dict[str, Any]:
    """The demo's honesty rules: is the run meaningful (the dense base learned the task), and did AHA keep
    the base's retrieval with most (token, head) pairs local?"""
    reasons = []
    valid = base_accuracy >= MIN_BASE_ACCURACY and base_accuracy - accuracy["local_only"] >= MIN_BASE_MARGIN
    if not valid:
        reasons.append(
            f"the dense base retrieves {base_accuracy:.1%} "
            f"(window only {accuracy['local_only']:.1%}); "
            f"needs >= {MIN_BASE_ACCURACY:.0%} and {MIN_BASE_MARGIN:.0%} above window-only attention"
        )
    gap = base_accuracy - accuracy["aha"]
    if gap > MAX_ACCURACY_GAP:
        reasons.append(f"AHA retrieval {accuracy['aha']:.1%} is {gap:.1%} below the dense base")
    if local_fraction < MIN_LOCAL_FRACTION:
        reasons.append(
            f"only {local_fraction:.1%} of (token, head) pairs are local (< {MIN_LOCAL_FRACTION:.0%})"
        )
    return {"valid": valid, "passed": valid and not reasons, "reasons": reasons}


def long_tail_curve(
    base: torch.nn.Module,
    config: AHADemoConfig,
    windows: list[int],
    data_factory,
    held_out: list,
    out: Path,
    common: dict[str, Any],
) -> list[dict[str, Any]]:
    """For each window W: convert a copy of the dense `base` to AHA at W, train its routers for
    `config.curve_steps` steps (same λ and leakage), and measure on `held_out` the fraction of (token, head)
    pairs on full attention and the retrieval accuracy of the learned routing."""
    from l2a.models import convert_model
    from l2a.training import train

    points = []
    for w in windows:
        model = convert_model(copy.deepcopy(base), sliding_window=w, method="aha")
        (out / f"w{w}" / "log.jsonl").unlink(missing_ok=True)
        train(
            model,
            None,
            _routed_train_config(config, out / f"w{w}", config.curve_steps, common),
            data=data_factory(),
        )
        hits, routed = retrieval_hits(model, held_out, config.batch_size)
        points.append(
            {
                "window": w,
                "routed_fraction": sum(routed) / len(routed),
                "routed_fraction_per_layer": routed,
                "accuracy": sum(hits) / len(hits),
            }
        )
        del model
    return points


def _plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = torch.tensor(report["head_fraction"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.4))
    image = left.imshow(heads.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto", origin="lower")
    for i in range(heads.shape[0]):
        for j in range(heads.shape[1]):
            value = float(heads[i, j])
            left.text(
                j, i, f"{value:.2f}", ha="center", va="center", color="black" if value > 0.6 else "white"
            )
    left.set_xticks(range(heads.shape[1]))
    left.set_yticks(range(heads.shape[0]), [str(i) for i in report["global_layers"]])
    left.set_xlabel("query head")
    left.set_ylabel("layer")
    left.set_title(f"full-attention fraction per head (local {report['local_fraction']:.1%})", fontsize=9)
    fig.colorbar(image, ax=left)
    buckets = report["accuracy_by_distance"]
    x = range(len(buckets))
    for name, style in (("all_global", "s-"), ("aha", "o-"), ("local_only", "^-")):
        right.plot(x, [100 * b[name] for b in buckets], style, label=name)
    right.plot(x, [100 * b["base"] for b in buckets], "k--", lw=1, label="base (dense, before AHA)")
    right.axhline(100 * report["chance"], color="gray", ls=":", lw=1, label="chance")
    right.set_xticks(list(x), [f"{b['min']}–{b['max'] - 1}" for b in buckets])
    right.set_ylim(-2, 102)
    right.set_xlabel(f"needle–query distance (tokens; window {report['config']['window']})")
    right.set_ylabel("retrieval accuracy (%)")
    right.legend(fontsize=8)
    right.set_title("Beyond-window key–value retrieval", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_long_tail(path: Path, points: list[dict[str, Any]], seq_len: int) -> None:
    """Fraction of (token, head) pairs on full attention (and retrieval accuracy) against the window W."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    windows = [p["window"] for p in points]
    ax.plot(windows, [100 * p["routed_fraction"] for p in points], "o-", label="(token, head) pairs on full")
    ax.plot(
        windows, [100 * p["accuracy"] for p in points], "s--", color="tab:green", label="retrieval accuracy"
    )
    ax.set_xscale("log", base=2)
    ax.set_xticks(windows, [str(w) for w in windows])
    ax.set_ylim(-2, 102)
    ax.set_xlabel(f"window W (tokens; sequences of {seq_len})")
    ax.set_ylabel("%")
    ax.set_title("AHA: need for full attention vs window", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run_aha_demo(
    out_dir: str | Path = "runs/demo_aha",
    *,
    seed: int = 0,
    quick: bool = False,
    config: AHADemoConfig | None = None,
    threads: int | None = 2,
    progress: bool = True,
    device: str = "cpu",
    base: str | Path = "embedded",
) -> dict[str, Any]:
    """Run the AHA demo; write ``report.json``, ``aha_routing.png`` (and ``long_tail.png`` with
    `curve_windows`) and the trained models to ``out_dir``.

    Arguments as `l2a.demo.run_demo`, including ``base`` (`l2a.demo_common.dense_base`: ``"embedded"``, the
    default, ``"scratch"``, or the directory of a dense base saved by an earlier demo run, ``DIR/base``).

    Returns the report: ``accuracy`` ``{"aha", "local_only", "all_global"}``, ``base_accuracy``,
    ``local_fraction`` (fraction of (token, head) pairs of the evaluation
    rows on window attention under the learned routing), ``head_fraction`` ([layer][head] fraction on full
    attention), ``global_fraction`` per routing and layer, ``accuracy_by_distance``, ``verdict``
    (``valid``, ``passed``, ``reasons``), ``long_tail`` (points of the curve, if asked), ``seconds``,
    ``cpu_seconds`` (process CPU time), ``config`` and the saved model directories.
    """
    from l2a.models import convert_model
    from l2a.training import train

    if quick and config is not None:
        raise ValueError("pass either quick=True or config, not both")
    config = AHADemoConfig.quick() if quick else (config or AHADemoConfig())
    torch_device = resolve_device(device)
    on_cpu = torch_device.type == "cpu"
    threads = threads if on_cpu else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir, base_dir = out / "model", out / "base"
    start, cpu_start = time.perf_counter(), time.process_time()
    with cpu_run_settings(torch_device, threads):
        run = start_demo(config, seed, base, out, torch_device, progress)
        rng, tokenizer, corpus, pool, held_out = run.rng, run.tokenizer, run.corpus, run.pool, run.held_out
        common, model, pre, checks, base_hits = run.common, run.model, run.pretrain, run.checks, run.base_hits
        dense = copy.deepcopy(model) if config.windows() else None

        aha = convert_model(model, sliding_window=config.window, method="aha")
        del model
        routed = train(
            aha,
            tokenizer,
            _routed_train_config(config, out / "routed", config.routed_steps, common),
            data=batches(config, corpus, pool, rng),
        )
        aha.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        results = evaluate_aha_routings(aha, held_out, config.batch_size)
        curve = []
        if dense is not None:
            curve_rng = random.Random(seed + 2)
            curve = long_tail_curve(
                dense,
                config,
                config.windows(),
                lambda: batches(config, corpus, pool, curve_rng),
                held_out,
                out / "long_tail",
                common,
            )

    distances = [d for row in held_out for d in row.distances]
    buckets = accuracy_by_distance(
        distances, {**{n: results[n]["hits"] for n in ROUTINGS}, "base": base_hits}
    )
    accuracy = {name: results[name]["accuracy"] for name in ROUTINGS}
    base_accuracy = sum(base_hits) / len(base_hits)
    routed_fraction = results["aha"]["routed_fraction"]
    local_fraction = 1.0 - sum(routed_fraction) / len(routed_fraction)
    report = {
        "method": "aha",
        "local_fraction": local_fraction,
        "head_fraction": results["aha"]["head_fraction"],
        "global_layers": list(aha.config.global_layers),
        "accuracy": accuracy,
        "base_accuracy": base_accuracy,
        "verdict": verdict(base_accuracy, accuracy, local_fraction),
        "accuracy_by_distance": buckets,
        "global_fraction": {name: results[name]["routed_fraction"] for name in ROUTINGS},
        "long_tail": curve,
        "chance": 10.0**-config.value_digits,
        "eval_queries": len(distances),
        "min_distance": min(distances),
        "seed": seed,
        "threads": threads,
        "device": str(torch_device),
        "precision": "fp32" if on_cpu else "bf16 autocast",
        "config": dataclasses.asdict(config),
        "model_dir": str(model_dir),
        "base_dir": str(base_dir),
        "eval_task_args": {"kv_retrieval": kv_task_args(config)},
        "base_from": str(base),
        "pretrain_steps_run": pre.step if pre else 0,
        "pretrain_checks": checks,
        "pretrain_last": pre.history[-1] if pre and pre.history else None,
        "routed_last": routed.history[-1] if routed.history else None,
    }
    _plot(out / "aha_routing.png", report)
    if curve:
        plot_long_tail(out / "long_tail.png", curve, config.seq_len)
    report["seconds"] = time.perf_counter() - start
    report["cpu_seconds"] = time.process_time() - cpu_start
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_aha_report(report: dict[str, Any]) -> str:
    """The AHA demo's result as a small text table and its verdict."""
    acc = report["accuracy"]
    full = 1.0 - report["local_fraction"]
    lines = [
        f"{'routing':<12} {'full (token, head)':>19} {'retrieval acc':>14}",
        f"{'aha':<12} {full:>18.1%} {acc['aha']:>13.1%}",
        f"{'local_only':<12} {0.0:>18.1%} {acc['local_only']:>13.1%}",
        f"{'all_global':<12} {1.0:>18.1%} {acc['all_global']:>13.1%}",
        f"{'base (dense)':<12} {1.0:>18.1%} {report['base_accuracy']:>13.1%}",
        "full-attention fraction per head: "
        + "; ".join(
            f"layer {layer}: " + " ".join(f"{x:.2f}" for x in heads)
            for layer, heads in zip(report["global_layers"], report["head_fraction"])
        ),
    ]
    for point in report["long_tail"]:
        lines.append(
            f"long tail: W={point['window']:<4} full {point['routed_fraction']:.1%}, "
            f"retrieval {point['accuracy']:.1%}"
        )
    v = report["verdict"]
    status = "PASSED" if v["passed"] else ("INVALID" if not v["valid"] else "FAILED")
    lines.append(
        f"{status}: {'; '.join(v['reasons']) or 'within 5 points of the base with >= 85% local pairs'}; "
        f"chance {report['chance']:.1%}; {report['eval_queries']} queries, needle–query distance ≥ "
        f"{report['min_distance']} tokens (window {report['config']['window']}); {report['seconds']:.0f} s "
        f"({report['cpu_seconds']:.0f} s CPU)"
    )
    return "\n".join(lines)
