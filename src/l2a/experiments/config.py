"""Configuration of the reproduction experiment (`l2a reproduce`): sections validated at construction.

Read from YAML/TOML with dotted ``--set`` overrides, with the same rules as `l2a train` recipes (unknown
keys are errors, numeric strings accepted). Lengths are multiples of the pretraining context ``data.seq_len``
(L): the extension trains at ``extend.factor`` · L and the evaluation runs at ``eval.length_factors`` · L.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from l2a.data.tasks import TASKS
from l2a.experiments.stages import ARMS
from l2a.training.config import _build, _check, _read_file, _Validated, apply_overrides

Arm = Literal["clp", "l2a", "swa", "random"]
RUNTIME_KEYS = ("device", "threads", "progress", "workers", "save_models")
"""Keys that may change between invocations on the same run directory (they do not change results)."""
ADDED_KEYS = {"extend": {"router_lr_scale": 1.0, "router_logit_offset": 0.0}}
"""Keys added after GPU runs were made, with their defaults: hashed into the fingerprint only when set to
another value, so the run directories of earlier configs keep their fingerprint."""


@dataclass
class ModelSection(_Validated):
    """The base Qwen3 model (byte tokenizer, vocabulary 259): head dim = hidden_size / num_heads."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    intermediate_size: int = 256
    rope_theta: float = 10_000.0

    def _validate(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            _check(getattr(self, name) >= 1, f"model.{name} must be >= 1")
        _check(
            self.hidden_size % self.num_heads == 0 and self.num_heads % self.num_kv_heads == 0,
            "model.hidden_size must be a multiple of num_heads, num_heads of num_kv_heads",
        )
        _check(self.rope_theta > 0, "model.rope_theta must be > 0")


@dataclass
class DataSection(_Validated):
    """Training rows: with probability `task_ratio` a task sample (loss on its answer only), else a slice
    of the embedded corpus with loss on its last `text_loss_tokens` tokens (None: all of them).

    tasks / task_weights: the training task mix (names of `l2a.data.tasks.TASKS`); task_args: per task,
    keyword overrides (also used in evaluation). task_pool: samples drawn per task and stage (rows reuse
    them). corpus_chars / heldout_chars: characters of corpus documents for training / for held-out
    perplexity (different documents). answer_reserve: tokens after a task prompt kept for its answer
    (the prompts of a row, or of an evaluation length N, have N - answer_reserve tokens).
    """

    seq_len: int = 128
    tasks: list[str] = field(default_factory=lambda: ["kv_retrieval"])
    task_weights: list[float] | None = None
    task_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    task_ratio: float = 0.5
    task_pool: int = 256
    text_loss_tokens: int | None = None
    corpus_chars: int = 400_000
    heldout_chars: int = 100_000
    answer_reserve: int = 64

    def _validate(self) -> None:
        _check(self.seq_len >= 16, f"data.seq_len must be >= 16, got {self.seq_len}")
        _check(
            1 <= self.answer_reserve <= self.seq_len // 2,
            f"data.answer_reserve must be in [1, seq_len / 2], got {self.answer_reserve}",
        )
        _check(len(self.tasks) > 0, "data.tasks must name at least one task")
        unknown = [t for t in [*self.tasks, *self.task_args] if t not in TASKS]
        _check(not unknown, f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
        _check(
            self.task_weights is None or len(self.task_weights) == len(self.tasks),
            "data.task_weights must have one weight per task",
        )
        _check(0.0 < self.task_ratio <= 1.0, f"data.task_ratio must be in (0, 1], got {self.task_ratio}")
        _check(self.task_pool >= 1, "data.task_pool must be >= 1")
        _check(
            self.text_loss_tokens is None or 1 <= self.text_loss_tokens <= self.seq_len,
            f"data.text_loss_tokens must be None or in [1, seq_len={self.seq_len}]",
        )
        _check(self.corpus_chars >= 1000 and self.heldout_chars >= 1000, "corpus sizes must be >= 1000")


@dataclass
class PretrainSection(_Validated):
    """Dense pretraining at L, all parameters trained, until the dense base's teacher-forced score at L
    over the training tasks reaches `target_score` (checked every `check_every` steps on `check_samples`
    held-out samples per task), `max_steps` (the bound on the budget; the cosine schedule is sized for it) or,
    when set, `max_seconds` of training wall clock (checked at each log step: a guard against a slower device
    than planned; the result records which bound stopped it). `task_loss`: labels of the task rows, their
    answer only or the whole sample (prompt too: its repeated keys and haystack train copying densely).
    `init_from`: an earlier run directory whose base (``init_from/base``) is trained on instead of a fresh
    initialisation (its architecture must match `model`)."""

    max_steps: int = 200
    max_seconds: float | None = None
    task_loss: Literal["answer", "all"] = "answer"
    init_from: str | None = None
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 20
    check_every: int = 50
    check_samples: int = 16
    target_score: float = 80.0
    checkpoint_every: int = 0

    def _validate(self) -> None:
        _check(self.max_steps >= 1 and self.batch_size >= 1, "pretrain.max_steps, batch_size must be >= 1")
        _check(self.lr > 0 and 0 <= self.warmup_steps <= self.max_steps, "pretrain.lr > 0, warmup <= steps")
        _check(self.check_every >= 1 and self.check_samples >= 1, "pretrain.check_* must be >= 1")
        _check(0.0 <= self.target_score <= 100.0, "pretrain.target_score must be in [0, 100]")
        _check(self.checkpoint_every >= 0, "pretrain.checkpoint_every must be >= 0")
        _check(self.max_seconds is None or self.max_seconds > 0, "pretrain.max_seconds must be > 0 or null")


@dataclass
class ExtendSection(_Validated):
    """Long-context extension to `factor` · L, the same rows and steps for every arm.

    Every arm: RoPE θ `rope_theta`, positions up to the largest evaluation length, `trainable` groups
    (plus the router for L2A), lr schedule. L2A only: λ ramped linearly to `regularizer_weight` over the
    first `ramp_fraction` of the steps, leakage steps with probability `leakage_probability`, and
    `router_only_steps` router-only steps first; `router_lr_scale` scales the routers' learning rate and
    `router_logit_offset` shifts every router logit of the converted arms (`L2AConfig.router_logit_offset`:
    > 0 starts the routers on the global side). Task prompts have lengths drawn from
    [`task_min_factor` · L, factor · L]. `window`: the sliding window W of the converted arms.
    """

    arms: list[Arm] = field(default_factory=lambda: list(ARMS))
    factor: int = 4
    steps: int = 50
    batch_size: int = 4
    lr: float = 1e-3
    warmup_steps: int = 5
    rope_theta: float = 40_000.0
    window: int = 32
    trainable: list[str] = field(default_factory=lambda: ["attention", "norms"])
    regularizer_weight: float = 1e-3
    ramp_fraction: float = 0.5
    leakage_probability: float = 0.1
    router_only_steps: int = 0
    router_lr_scale: float = 1.0
    router_logit_offset: float = 0.0
    task_min_factor: float = 1.0
    text_loss_tokens: int | None = None
    checkpoint_every: int = 0

    def _validate(self) -> None:
        _check(len(self.arms) == len(set(self.arms)) and self.arms, "extend.arms must be distinct, non-empty")
        _check("random" not in self.arms or "l2a" in self.arms, "the random arm needs the l2a arm")
        _check(self.factor >= 1 and self.steps >= 1 and self.batch_size >= 1, "extend sizes must be >= 1")
        _check(self.lr > 0 and 0 <= self.warmup_steps <= self.steps, "extend.lr > 0, warmup <= steps")
        _check(self.rope_theta > 0 and self.window >= 1, "extend.rope_theta > 0, window >= 1")
        _check("router" not in self.trainable, "extend.trainable: the router is added for the l2a arm only")
        _check(self.regularizer_weight >= 0, "extend.regularizer_weight must be >= 0")
        _check(0.0 <= self.ramp_fraction <= 1.0, "extend.ramp_fraction must be in [0, 1]")
        _check(0.0 <= self.leakage_probability <= 1.0, "extend.leakage_probability must be in [0, 1]")
        _check(0 <= self.router_only_steps <= self.steps, "extend.router_only_steps must be in [0, steps]")
        _check(self.router_lr_scale > 0, "extend.router_lr_scale must be > 0")
        _check(math.isfinite(self.router_logit_offset), "extend.router_logit_offset must be a finite number")
        _check(0.0 < self.task_min_factor <= self.factor, "extend.task_min_factor must be in (0, factor]")
        _check(self.checkpoint_every >= 0, "extend.checkpoint_every must be >= 0")


@dataclass
class EvalSection(_Validated):
    """Evaluation of every arm at `length_factors` · L: `tasks` (default: the training tasks) with
    `samples` teacher-forced samples per task and length; perplexity by position over
    `perplexity_windows` held-out windows of the largest length; routing (needles vs haystack) over
    `routing_samples` prompts per task at factor · L."""

    length_factors: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    tasks: list[str] | None = None
    samples: int = 100
    batch_size: int = 8
    perplexity_windows: int = 8
    routing_samples: int = 4

    def _validate(self) -> None:
        _check(self.length_factors and min(self.length_factors) >= 1, "eval.length_factors must be >= 1")
        _check(self.length_factors == sorted(set(self.length_factors)), "eval.length_factors must increase")
        unknown = [t for t in self.tasks or [] if t not in TASKS]
        _check(not unknown, f"unknown eval task(s) {unknown}; known: {', '.join(TASKS)}")
        _check(min(self.samples, self.batch_size, self.perplexity_windows) >= 1, "eval sizes must be >= 1")
        _check(self.routing_samples >= 0, "eval.routing_samples must be >= 0")


@dataclass
class PruneSection(_Validated):
    """Pruning of the L2A arm: for each fraction f, the round(f · layers) sparsest global layers (lowest
    routed fraction at factor · L) lose their global branch; f ≤ 0.5 (at most half of the layers)."""

    fractions: list[float] = field(default_factory=lambda: [0.25, 0.5])

    def _validate(self) -> None:
        _check(all(0.0 < f <= 0.5 for f in self.fractions), "prune.fractions must lie in (0, 0.5]")


@dataclass
class TargetsSection(_Validated):
    """The targets of issue 13, checked at factor · L over the evaluation tasks' mean score."""

    l2a_relative_gap: float = 0.03
    l2a_min_sparsity: float = 0.8
    baseline_gap_points: float = 10.0
    prune_max_cost_points: float = 1.0


@dataclass
class ReproductionConfig(_Validated):
    """Everything `run_reproduction` needs; `RUNTIME_KEYS` may change between runs of one directory."""

    name: str = "reproduction"
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    progress: bool = True
    workers: int = 1
    save_models: bool = False
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    extend: ExtendSection = field(default_factory=ExtendSection)
    eval: EvalSection = field(default_factory=EvalSection)
    prune: PruneSection = field(default_factory=PruneSection)
    targets: TargetsSection = field(default_factory=TargetsSection)

    def _validate(self) -> None:
        sections = {
            "model": ModelSection,
            "data": DataSection,
            "pretrain": PretrainSection,
            "extend": ExtendSection,
            "eval": EvalSection,
            "prune": PruneSection,
            "targets": TargetsSection,
        }
        for name, cls in sections.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _build(cls, value, prefix=f"{name}."))
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "bad device")
        _check(self.workers >= 1, f"workers must be >= 1, got {self.workers}")
        _check(self.threads is None or self.threads >= 1, "threads must be >= 1 or null")
        _check(
            self.extend.window < self.data.seq_len,
            f"extend.window={self.extend.window} must be below data.seq_len={self.data.seq_len}",
        )
        _check(
            self.data.text_loss_tokens is None or self.data.text_loss_tokens <= self.data.seq_len,
            "data.text_loss_tokens exceeds data.seq_len",
        )
        long = self.extend.factor * self.data.seq_len
        _check(
            self.extend.text_loss_tokens is None or self.extend.text_loss_tokens <= long,
            f"extend.text_loss_tokens exceeds the extension length {long}",
        )

    @property
    def eval_tasks(self) -> list[str]:
        return list(self.eval.tasks or self.data.tasks)

    @property
    def eval_lengths(self) -> list[int]:
        return [f * self.data.seq_len for f in self.eval.length_factors]

    @property
    def long_length(self) -> int:
        """The extension length, factor · L (the length the targets are checked at)."""
        return self.extend.factor * self.data.seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of every key that changes results (all but `RUNTIME_KEYS`)."""
        values = {k: v for k, v in self.to_dict().items() if k not in RUNTIME_KEYS}
        for section, defaults in ADDED_KEYS.items():
            for key, default in defaults.items():
                if values[section][key] == default:
                    del values[section][key]
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def load_reproduction_config(path: str | Path, overrides: list[str] | None = None) -> ReproductionConfig:
    """Read a YAML/TOML experiment file and apply dotted ``KEY=VALUE`` overrides (``extend.steps=100``)."""
    values = _read_file(Path(path))
    apply_overrides(values, list(overrides or []))
    return _build(ReproductionConfig, values, prefix="")


def stage_flops(config: ReproductionConfig) -> dict[str, float]:
    """Estimated FLOPs of each stage from the model and data sizes (an estimate, not a measurement).

    Training: 6 · P · tokens + 6 · layers · Hq · D · n per token of an n-token row (dense causal
    attention, `l2a.training.metrics.flops_coefficients`); evaluation: a third of that (forward only).
    P counts the non-embedding parameters; converted arms count their attention projections twice
    (local and global branch) and their attention as dense (the upper bound: leakage steps and early
    steps route every token). Pretraining checks, sample generation and Python overhead are not counted.
    """
    m, L = config.model, config.data.seq_len
    head_dim = m.hidden_size // m.num_heads
    attention = 2 * m.hidden_size * head_dim * (m.num_heads + m.num_kv_heads)
    params = m.num_layers * (attention + 3 * m.hidden_size * m.intermediate_size)
    per_pair = 6.0 * m.num_layers * m.num_heads * head_dim

    def train_flops(p: float, steps: int, rows: int, n: int) -> float:
        tokens = steps * rows * n
        return 6.0 * p * tokens + per_pair * n * tokens

    def eval_flops(p: float) -> float:
        tasks = len(config.eval_tasks) * config.eval.samples
        total = sum(train_flops(p, tasks, 1, n) for n in config.eval_lengths)
        return total / 3.0 + train_flops(p, config.eval.perplexity_windows, 1, max(config.eval_lengths)) / 3

    converted = params + m.num_layers * attention
    e = config.extend
    out = {"pretrain": train_flops(params, config.pretrain.max_steps, config.pretrain.batch_size, L)}
    out["pretrain"] += train_flops(params, len(config.eval_tasks) * config.eval.samples, 1, L) / 3
    for arm in e.arms:
        p = params if arm == "clp" else converted
        evals = 1 + (len(config.prune.fractions) if arm == "l2a" else 0)
        out[arm] = train_flops(p, e.steps, e.batch_size, config.long_length) + evals * eval_flops(p)
    out["parameters"] = float(params + 259 * m.hidden_size)
    return out
