"""The embedded demo: train a tiny Qwen3-style model, convert it to L2A, route it, and show that it works.

`run_demo` runs on a laptop CPU in a few minutes with no download:

1. builds a tiny `Qwen3ForCausalLM` over the byte tokenizer;
2. pretrains it with full attention on the Python standard library's sources mixed with the synthetic
   ``kv_retrieval`` task of `l2a.data.tasks` (key-value pairs hidden in that text, queried at the end);
3. converts it to L2A with a small sliding window (`l2a.convert_model`);
4. trains attention, norms and routers with the sparsity regulariser (λ ramp) and leakage steps;
5. evaluates beyond-window key–value retrieval for three routings of the same weights: the learned one,
   ``force_route="none"`` (local attention only) and ``force_route="all"`` (every token global);
6. writes ``report.json`` and ``routing.png`` (sparsity per layer, accuracy by needle–query distance),
   and saves the trained models (``model``: L2A, ``base``: the full-attention model before conversion)
   with the byte tokenizer, ready for ``l2a eval``.

The same pipeline runs on a GPU (``device="cuda"``) and at other sizes (`DemoConfig.with_overrides`,
``l2a demo --set KEY=VALUE``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import torch

from l2a.demo_common import (
    TaskRow,
    accuracy_by_distance,
    batches,
    build_base_model,
    cpu_run_settings,
    eval_rows,
    kv_task_args,
    resolve_device,
    retrieval_hits,
    start_demo,
)

__all__ = [
    "ROUTINGS",
    "TARGETS",
    "DemoConfig",
    "TaskRow",
    "build_base_model",
    "check_targets",
    "eval_rows",
    "evaluate_routings",
    "format_report",
    "kv_task_args",
    "resolve_device",
    "retrieval_hits",
    "run_demo",
    "task_arg_flags",
    "verdict",
]

ROUTINGS = {"l2a": None, "local_only": "none", "all_global": "all"}
"""Report key → `L2AConfig.force_route` of the evaluated routing."""

TARGETS: dict[str, tuple[Literal["min", "max"], float]] = {
    "base_accuracy": ("min", 0.80),
    "l2a_accuracy": ("min", 0.80),
    "sparsity": ("min", 0.85),
    "local_only_accuracy": ("max", 0.05),
}
"""The documented result of the default demo: report key → (bound kind, bound). Beyond-window retrieval of
the dense base ≥ 80 % (below it the run is invalid: pretraining did not learn retrieval, so the table
compares L2A with a model that cannot retrieve), of the learned routing ≥ 80 % with ≥ 85 % of tokens
skipping global attention, and of local-only attention ≤ 5 % (chance is 1 %)."""


@dataclass
class DemoConfig:
    """Sizes and schedule of the demo; the defaults are tuned to finish in about 3 minutes on 2 CPU cores.

    Model: a Qwen3 decoder with `hidden_size`, `num_layers`, `num_heads` (head dim `hidden_size //
    num_heads`), `num_kv_heads` and an MLP of `4 * hidden_size`.
    Data: sequences of `seq_len` byte tokens; each training row is a task sample with probability
    `task_ratio` (loss on the answers only), else a slice of the corpus with loss on its last
    `text_loss_tokens` tokens. The trainer averages the loss over labelled tokens, so these two counts
    set the weight of retrieval against language modelling; a full-text loss drowns the answers.
    Task: ``kv_retrieval`` (`filler` "corpus": needles in standard-library text, plus `distractors`
    unqueried pairs) with `key_chars` letters per key, `value_digits` digits per value and `num_queries`
    queries per sample; every needle lies more than `window` tokens before its query. Samples come from a
    pool of `task_pool` (generating one costs milliseconds); evaluation uses `eval_samples` others.
    Training: at most `pretrain_steps` full-attention steps at `pretrain_lr`; every `pretrain_check_every`
    steps the dense model's retrieval is measured on `validation_samples` further samples, and pretraining
    stops once it reaches `pretrain_target` (the onset of retrieval varies with the seed and with the
    CPU's floating-point behaviour: the check makes the run wait for it, within the budget). Then
    `routed_steps` L2A steps at `routed_lr` with λ ramped linearly to `regularizer_weight` over the first
    `ramp_fraction` of them and dense-global leakage steps with probability `leakage_probability`.
    """

    seq_len: int = 128
    window: int = 32
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    batch_size: int = 32
    task_ratio: float = 0.5
    key_chars: int = 2
    value_digits: int = 2
    num_queries: int = 4
    filler: Literal["corpus", "pairs"] = "corpus"
    distractors: int = 0
    text_loss_tokens: int = 16
    task_pool: int = 1024
    eval_samples: int = 96
    pretrain_steps: int = 2800
    pretrain_lr: float = 3e-3
    pretrain_check_every: int = 100
    pretrain_target: float = 0.9
    validation_samples: int = 32
    routed_steps: int = 150
    routed_lr: float = 1e-3
    regularizer_weight: float = 1e-3
    ramp_fraction: float = 0.5
    leakage_probability: float = 0.1
    corpus_chars: int = 400_000

    def __post_init__(self) -> None:
        for name, tp in get_type_hints(type(self)).items():
            value = getattr(self, name)
            if tp is int and value < (0 if name == "distractors" else 1):
                raise ValueError(f"{name} must be {'>= 0' if name == 'distractors' else '>= 1'}, got {value}")
        if min(self.pretrain_lr, self.routed_lr) <= 0 or self.regularizer_weight < 0:
            raise ValueError("pretrain_lr and routed_lr must be > 0, regularizer_weight >= 0")
        if not (0.0 <= self.ramp_fraction <= 1.0 and 0.0 <= self.leakage_probability <= 1.0):
            raise ValueError("ramp_fraction and leakage_probability must lie in [0, 1]")
        if not 0.0 <= self.pretrain_target <= 1.0:
            raise ValueError(f"pretrain_target must lie in [0, 1], got {self.pretrain_target}")
        if self.text_loss_tokens > self.seq_len:
            raise ValueError(f"text_loss_tokens={self.text_loss_tokens} exceeds seq_len={self.seq_len}")
        if self.seq_len < 4 * self.window:
            raise ValueError(f"seq_len={self.seq_len} must be at least 4 * window={4 * self.window}")
        if not 0.0 < self.task_ratio <= 1.0:
            raise ValueError(f"task_ratio must lie in (0, 1], got {self.task_ratio}")
        if self.filler not in ("corpus", "pairs"):
            raise ValueError(f"filler must be 'corpus' or 'pairs', got {self.filler!r}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must be a multiple of num_heads, num_heads of num_kv_heads")

    @classmethod
    def quick(cls) -> DemoConfig:
        """A reduced run (tens of seconds) for tests: same pipeline, far fewer steps and samples."""
        return cls(
            pretrain_steps=30,
            pretrain_check_every=10,
            routed_steps=20,
            task_pool=64,
            eval_samples=16,
            corpus_chars=100_000,
        )

    def with_overrides(self, overrides: Iterable[str]) -> DemoConfig:
        """A copy with ``KEY=VALUE`` strings applied in order (``l2a demo --set``), validated again.

        Values are converted to the field's type: int fields take integers (``3000``), float fields any
        number (``3e-3``), string fields the text as given. Raises ValueError naming the key on an unknown
        key, a value of the wrong type, or a resulting config that fails validation.
        """
        overrides = list(overrides)
        hints = get_type_hints(type(self))
        changes: dict[str, Any] = {}
        for item in overrides:
            key, sep, raw = item.partition("=")
            key, raw = key.strip(), raw.strip()
            if not sep or not key:
                raise ValueError(f"override {item!r} must look like KEY=VALUE, e.g. seq_len=256")
            if key not in hints:
                raise ValueError(f"unknown demo config key {key!r}; valid keys: {', '.join(hints)}")
            changes[key] = _convert(key, raw, hints[key])
        try:
            return dataclasses.replace(self, **changes)
        except ValueError as error:
            raise ValueError(f"invalid demo config after {list(overrides)}: {error}") from None


def _convert(key: str, raw: str, tp: Any) -> Any:
    """``raw`` as a value of the `DemoConfig` field type ``tp`` (int, float, str or a Literal of str)."""
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{key} takes an integer, got {raw!r}") from None
    if tp is float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{key} takes a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"{key} takes a finite number, got {raw!r}")
        return value
    if get_origin(tp) is Literal:
        if raw not in get_args(tp):
            raise ValueError(f"{key} must be one of {list(get_args(tp))}, got {raw!r}")
        return raw
    if tp is str:
        return raw
    raise TypeError(f"{key}: unsupported field type {tp!r}")


def evaluate_routings(model: torch.nn.Module, rows: list[TaskRow], batch_size: int) -> dict[str, Any]:
    """`retrieval_hits` of an L2A model under each routing of `ROUTINGS` (`config.force_route`).

    Returns per routing: ``hits``, ``accuracy`` and ``routed_fraction`` (per global layer).
    """
    saved = model.config.force_route
    results: dict[str, Any] = {}
    try:
        for name, force in ROUTINGS.items():
            model.config.force_route = force
            hits, routed = retrieval_hits(model, rows, batch_size)
            results[name] = {"hits": hits, "accuracy": sum(hits) / len(hits), "routed_fraction": routed}
    finally:
        model.config.force_route = saved
    return results


def _plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    layers = report["global_layers"]
    left.bar([str(i) for i in layers], report["sparsity_per_layer"], color="tab:blue")
    left.axhline(report["sparsity"], color="k", ls="--", lw=1, label=f"mean {report['sparsity']:.2f}")
    left.set_ylim(0, 1)
    left.set_xlabel("layer")
    left.set_ylabel("tokens skipping global attention")
    left.legend(loc="lower right")
    left.set_title("L2A sparsity per layer")
    buckets = report["accuracy_by_distance"]
    labels = [f"{b['min']}–{b['max'] - 1}" for b in buckets]
    x = range(len(buckets))
    for name, style in (("all_global", "s-"), ("l2a", "o-"), ("local_only", "^-")):
        right.plot(x, [100 * b[name] for b in buckets], style, label=name)
    right.plot(x, [100 * b["base"] for b in buckets], "k--", lw=1, label="base (dense, before L2A)")
    right.axhline(100 * report["chance"], color="gray", ls=":", lw=1, label="chance")
    right.set_xticks(list(x), labels)
    right.set_ylim(-2, 102)
    right.set_xlabel(f"needle–query distance (tokens; window {report['config']['window']})")
    right.set_ylabel("retrieval accuracy (%)")
    right.legend(fontsize=8)
    right.set_title("Beyond-window key–value retrieval")
    if not report["valid"]:
        fig.suptitle("INVALID RUN: the dense base did not learn retrieval", color="red", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run_demo(
    out_dir: str | Path = "runs/demo",
    *,
    seed: int = 0,
    quick: bool = False,
    config: DemoConfig | None = None,
    threads: int | None = 2,
    progress: bool = True,
    device: str = "cpu",
    base: str | Path = "embedded",
) -> dict[str, Any]:
    """Run the whole demo; write ``report.json``, ``routing.png`` and the trained models to ``out_dir``.

    Args:
        out_dir: output directory (created). ``out_dir/model`` receives the routed L2A model and
            ``out_dir/base`` the full-attention Qwen3 model before conversion (``save_pretrained``, each
            with the byte tokenizer: ``l2a eval`` loads them without ``--tokenizer``).
        seed: seeds model initialisation, data and leakage draws; on CPU the run is deterministic given it.
        quick: use `DemoConfig.quick()` (a reduced run for tests); exclusive with ``config``.
        config: sizes and schedule (default `DemoConfig()`).
        threads: `torch.set_num_threads` for a CPU run (None: leave as is; ignored on CUDA).
        progress: show tqdm progress bars.
        device: "cpu" (default), "cuda", "cuda:N" or "auto" (cuda when available). Training runs in fp32
            on CPU and under bf16 autocast on CUDA (`TrainConfig.precision="auto"`); the report's
            evaluation runs the fp32 weights without autocast on either.
        base: the dense model to convert (`l2a.demo_common.dense_base`): ``"embedded"`` (default) the
            package's pretrained tiny base (`EMBEDDED_BASE`, default sizes only), ``"scratch"`` pretrains
            one until it retrieves (its onset varies with the seed and the CPU: the run may end invalid),
            or the directory of a base saved by an earlier run (``DIR/base``).

    Returns:
        the report: ``sparsity`` (mean fraction of tokens skipping global attention on the evaluation
        sequences), ``sparsity_per_layer``, ``accuracy`` ``{"l2a", "local_only", "all_global"}`` (fractions
        of queries whose value is predicted exactly), ``base_accuracy`` (the full-attention model before
        conversion), ``accuracy_by_distance``, ``global_fraction`` (per routing and layer), ``chance``,
        ``seconds``, ``config``, ``device``, ``precision``, ``model_dir`` / ``base_dir`` (the saved models),
        ``eval_task_args`` (``{"kv_retrieval": kwargs}`` of the task samples, for ``l2a eval --task-arg``),
        ``pretrain_steps_run`` and ``pretrain_checks`` (dense retrieval on the validation samples by step),
        the training histories' last records, and the standing against `TARGETS` (`check_targets`):
        ``valid`` (False: the dense base did not learn retrieval, the run shows nothing), ``targets_met``
        and ``targets``.
    """
    from l2a.models import convert_model
    from l2a.training import TrainConfig, train

    if quick and config is not None:
        raise ValueError("pass either quick=True or config, not both")
    config = DemoConfig.quick() if quick else (config or DemoConfig())
    torch_device = resolve_device(device)
    on_cpu = torch_device.type == "cpu"
    threads = threads if on_cpu else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir, base_dir = out / "model", out / "base"
    start = time.perf_counter()
    with cpu_run_settings(torch_device, threads):
        run = start_demo(config, seed, base, out, torch_device, progress)
        rng, tokenizer, corpus, pool, held_out = run.rng, run.tokenizer, run.corpus, run.pool, run.held_out
        common, model, pre, checks, base_hits = run.common, run.model, run.pretrain, run.checks, run.base_hits
        l2a_model = convert_model(model, sliding_window=config.window)
        del model
        # the paper's default: attention, norms and router train; MLPs, embeddings not
        routed = train(
            l2a_model,
            tokenizer,
            TrainConfig(
                output_dir=str(out / "routed"),
                steps=config.routed_steps,
                optim={"lr": config.routed_lr, "warmup_steps": min(10, config.routed_steps)},
                router={
                    "regularizer_weight": config.regularizer_weight,
                    "regularizer_schedule": "linear",
                    "regularizer_ramp_steps": max(1, int(config.ramp_fraction * config.routed_steps)),
                    "leakage_probability": config.leakage_probability,
                },
                # the recipe's numbers were measured with HF's own loss
                loss_impl="plain",
                **common,
            ),
            data=batches(config, corpus, pool, rng),
        )
        l2a_model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)

        results = evaluate_routings(l2a_model, held_out, config.batch_size)

    distances = [d for row in held_out for d in row.distances]
    buckets = accuracy_by_distance(
        distances, {**{n: results[n]["hits"] for n in ROUTINGS}, "base": base_hits}
    )
    sparsity_per_layer = [1.0 - f for f in results["l2a"]["routed_fraction"]]
    report = {
        "sparsity": sum(sparsity_per_layer) / len(sparsity_per_layer),
        "sparsity_per_layer": sparsity_per_layer,
        "global_layers": list(l2a_model.config.global_layers),
        "accuracy": {name: results[name]["accuracy"] for name in ROUTINGS},
        "base_accuracy": sum(base_hits) / len(base_hits),
        "accuracy_by_distance": buckets,
        "global_fraction": {name: results[name]["routed_fraction"] for name in ROUTINGS},
        "chance": 10.0**-config.value_digits,
        "eval_queries": len(distances),
        "min_distance": min(distances),
        "seconds": time.perf_counter() - start,
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
    report |= check_targets(report)
    _plot(out / "routing.png", report)
    report["seconds"] = time.perf_counter() - start
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def check_targets(report: dict[str, Any]) -> dict[str, Any]:
    """The report's standing against `TARGETS`: ``{"valid", "targets_met", "targets"}``.

    ``valid`` is False when the dense base missed its bound: pretraining did not learn retrieval, and the
    run shows nothing about L2A. ``targets`` maps each target to its value, bound and whether it is met.
    """
    values = {
        "base_accuracy": report["base_accuracy"],
        "l2a_accuracy": report["accuracy"]["l2a"],
        "sparsity": report["sparsity"],
        "local_only_accuracy": report["accuracy"]["local_only"],
    }
    targets = {}
    for name, (kind, bound) in TARGETS.items():
        met = values[name] >= bound if kind == "min" else values[name] <= bound
        targets[name] = {"value": values[name], kind: bound, "met": met}
    return {
        "valid": targets["base_accuracy"]["met"],
        "targets_met": all(t["met"] for t in targets.values()),
        "targets": targets,
    }


def verdict(report: dict[str, Any]) -> str:
    """One plain sentence on what the run shows: invalid (the dense base did not learn retrieval), the
    documented result reached, or which targets were missed."""
    targets = report["targets"]
    if not report["valid"]:
        base = targets["base_accuracy"]
        cause = (
            f"pretraining did not learn retrieval in {report['pretrain_steps_run']} steps"
            if report.get("base_from", "scratch") == "scratch"
            else f"the base loaded from {report['base_from']} does not retrieve"
        )
        return (
            f"INVALID RUN: the dense base model retrieves only {base['value']:.1%} "
            f"(needs >= {base['min']:.0%}): {cause}, so this table compares L2A with a model that cannot "
            "retrieve and shows nothing about L2A."
        )
    if report["targets_met"]:
        return "Documented result reached: " + _targets_text(targets) + "."
    missed = {name: t for name, t in targets.items() if not t["met"]}
    return "Targets missed: " + _targets_text(missed) + "."


def _targets_text(targets: dict[str, dict[str, Any]]) -> str:
    parts = []
    for name, t in targets.items():
        kind = "min" if "min" in t else "max"
        parts.append(f"{name} {t['value']:.1%} ({'>=' if kind == 'min' else '<='} {t[kind]:.0%})")
    return ", ".join(parts)


def task_arg_flags(report: dict[str, Any]) -> str:
    """The ``--tasks`` and ``--task-arg`` options of ``l2a eval`` that reproduce the demo's task format."""
    parts = []
    for task, args in report["eval_task_args"].items():
        parts.append(f"--tasks {task}")
        parts += [f"--task-arg {task}.{key}={value}" for key, value in args.items()]
    return " ".join(parts)


def format_report(report: dict[str, Any]) -> str:
    """The demo's result as a small text table."""
    acc = report["accuracy"]
    lines = [
        f"{'routing':<12} {'global tokens':>14} {'retrieval acc':>14}",
        f"{'l2a':<12} {1 - report['sparsity']:>13.1%} {acc['l2a']:>13.1%}",
        f"{'local_only':<12} {0.0:>13.1%} {acc['local_only']:>13.1%}",
        f"{'all_global':<12} {1.0:>13.1%} {acc['all_global']:>13.1%}",
        f"{'base (dense)':<12} {1.0:>13.1%} {report['base_accuracy']:>13.1%}",
        f"chance {report['chance']:.1%}; sparsity per layer "
        + ", ".join(f"{s:.2f}" for s in report["sparsity_per_layer"])
        + f"; {report['eval_queries']} queries, needle–query distance ≥ {report['min_distance']} tokens "
        + f"(window {report['config']['window']}); {report['seconds']:.0f} s",
        f"pretraining: {report['pretrain_steps_run']} steps; dense retrieval on validation samples by step: "
        + (
            ", ".join(f"{c['step']}: {c['accuracy']:.0%}" for c in report["pretrain_checks"]) or "not checked"
        ),
        verdict(report),
    ]
    if not report["valid"]:
        lines.insert(0, verdict(report))
    return "\n".join(lines)
