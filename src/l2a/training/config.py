"""Training configuration: nested dataclasses validated at construction, loaded from YAML/TOML.

`load_config(path, overrides)` reads a YAML (`.yaml`/`.yml`) or TOML (`.toml`) file and applies dotted
overrides such as `optim.lr=1e-4` or `data.sources=[a.jsonl,b.jsonl]` (values parsed as YAML scalars).
Unknown keys are errors (naming the closest valid key); values are coerced to the field types (YAML reads
`5e-5` as a string, so numeric fields accept numeric strings). Every mistake is a ValueError naming the key
or the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

TRAINABLE_GROUPS = ("attention", "norms", "router", "mlp", "embeddings", "lm_head", "other")
"""Named parameter groups accepted in `TrainConfig.trainable` (see `l2a.training.params`)."""


def did_you_mean(word: str, choices: typing.Iterable[str], prefix: str = "") -> str:
    """`"; did you mean 'PREFIXx'?"` for the closest `x` of `choices` to a mistyped `word`, else `""`."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {prefix + close[0]!r}?" if close else ""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


class _Validated:
    """Checks `Literal[...]` fields, then the class's own `_validate`, at construction."""

    def __post_init__(self) -> None:
        for name, tp in get_type_hints(type(self)).items():
            value = getattr(self, name)
            choices = _literal_choices(tp)
            if choices is not None and value not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
        self._validate()

    def _validate(self) -> None:
        pass


def _literal_choices(tp: Any) -> tuple | None:
    if get_origin(tp) is Literal:
        return get_args(tp)
    if get_origin(tp) in (typing.Union, types.UnionType):
        for option in get_args(tp):
            if get_origin(option) is Literal:
                return (*get_args(option), *([None] if type(None) in get_args(tp) else []))
    return None


@dataclass
class DataConfig(_Validated):
    """Where training sequences come from (used when `train` is not given an in-memory `data`).

    sources: corpus sources read by `l2a.data.iter_documents`: directories (of .txt/.py/.md, .jsonl,
        .parquet), .jsonl or .parquet files, or "stdlib" (the embedded corpus, the default).
    tokenizer: None = the model directory's tokenizer, "byte" = `l2a.data.byte_tokenizer()`, else a path/name
        for `l2a.data.load_tokenizer`.
    seq_len: tokens per packed sequence (N).
    micro_batch_size: sequences per micro-step per rank (must be 1 with `separate_documents`, because
        `cu_seqlens` describes one packed row).
    separate_documents: pack with `cu_seqlens` and per-document `position_ids` so documents do not attend
        to each other.
    task, task_ratio, task_kwargs: mix samples of the task `task` (a name in `l2a.data.tasks.TASKS`,
        built with `get_task(task, **task_kwargs)`) into the corpus stream: each sequence is a task
        sample with probability `task_ratio` (`l2a.data.MixedDataset`).
    task_loss: "all" (LM loss on the whole task sample) or "answer" (on the answer tokens only).
    task_min_length: None: task prompts fill the sequence; else their length is drawn from
        [task_min_length, seq_len] (varied needle distances).
    """

    sources: list[str] = field(default_factory=lambda: ["stdlib"])
    tokenizer: str | None = None
    seq_len: int = 2048
    micro_batch_size: int = 1
    separate_documents: bool = True
    task: str | None = None
    task_ratio: float = 0.0
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    task_loss: Literal["all", "answer"] = "all"
    task_min_length: int | None = None

    def _validate(self) -> None:
        _check(len(self.sources) > 0, "data.sources must name at least one corpus source")
        _check(self.seq_len >= 2, f"data.seq_len must be >= 2, got {self.seq_len}")
        _check(self.micro_batch_size >= 1, f"data.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        _check(
            not (self.separate_documents and self.micro_batch_size != 1),
            "data.separate_documents packs one row with cu_seqlens per micro-step: "
            f"data.micro_batch_size must be 1, got {self.micro_batch_size}",
        )
        _check(0.0 <= self.task_ratio <= 1.0, f"data.task_ratio must be in [0, 1], got {self.task_ratio}")
        _check(
            self.task is not None or self.task_ratio == 0.0,
            f"data.task_ratio={self.task_ratio} needs data.task to name a task",
        )
        _check(
            self.task is not None or not self.task_kwargs, "data.task_kwargs given but data.task is not set"
        )
        _check(self.task is None or self.task_ratio > 0, f"data.task={self.task!r} needs data.task_ratio > 0")
        _check(
            self.task_min_length is None or 1 <= self.task_min_length <= self.seq_len,
            f"data.task_min_length must be in [1, seq_len={self.seq_len}], got {self.task_min_length}",
        )


@dataclass
class OptimConfig(_Validated):
    """AdamW with linear warm-up then a cosine / linear / constant learning-rate schedule.

    The schedule decays from `lr` to `lr * min_lr_ratio` between `warmup_steps` and the last step.
    `grad_clip`: max global L2 norm of the gradients (None: no clipping; the norm is still logged).
    `router_lr_scale`: the routers' learning rate is `lr * router_lr_scale` (same schedule, own group).
    """

    lr: float = 5e-5
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    router_lr_scale: float = 1.0

    def _validate(self) -> None:
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(self.router_lr_scale > 0, f"optim.router_lr_scale must be > 0, got {self.router_lr_scale}")
        _check(
            0.0 <= self.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"
        )
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(all(0.0 <= b < 1.0 for b in self.betas), f"optim.betas must lie in [0, 1), got {self.betas}")
        _check(self.eps > 0, f"optim.eps must be > 0, got {self.eps}")
        _check(
            self.grad_clip is None or self.grad_clip > 0,
            f"optim.grad_clip must be > 0 or None, got {self.grad_clip}",
        )


@dataclass
class RouterConfig(_Validated):
    """Router regulariser λ(step) and leakage steps.

    regularizer_weight: final λ; the loss is `lm_loss + λ(step) · router_regularizer`.
    regularizer_schedule: "constant" (λ from step 0), "linear" or "cosine" ramp from 0 to λ over
        `regularizer_ramp_steps` (None: the whole run).
    leakage_probability: probability p that a step computes dense global attention for all tokens
        (`global_leakage=True`); drawn from a generator seeded by (seed, step), identical on every rank.
    router_only_steps: the first that many steps update only the router parameters (the other trainable
        parameters get no gradient), so routing settles before attention adapts; 0 = off.
    collapse: what a log step does when routing has collapsed (`l2a.training.metrics.routing_collapse`:
        no token routed in any layer, every token routed in every layer once λ is at its final value, or
        single layers routing no token while λ still ramps):
        "ignore", "warn" (a warning once per kind, and `routing_collapse` in every log record that shows
        it) or "stop" (RuntimeError).
    """

    regularizer_weight: float = 1e-8
    regularizer_schedule: Literal["constant", "linear", "cosine"] = "linear"
    regularizer_ramp_steps: int | None = None
    leakage_probability: float = 0.1
    router_only_steps: int = 0
    collapse: Literal["ignore", "warn", "stop"] = "warn"

    def _validate(self) -> None:
        _check(
            self.regularizer_weight >= 0,
            f"router.regularizer_weight must be >= 0, got {self.regularizer_weight}",
        )
        _check(
            self.regularizer_ramp_steps is None or self.regularizer_ramp_steps >= 1,
            f"router.regularizer_ramp_steps must be >= 1 or None, got {self.regularizer_ramp_steps}",
        )
        _check(
            0.0 <= self.leakage_probability <= 1.0,
            f"router.leakage_probability must be in [0, 1], got {self.leakage_probability}",
        )
        _check(
            self.router_only_steps >= 0,
            f"router.router_only_steps must be >= 0, got {self.router_only_steps}",
        )


@dataclass
class CheckpointConfig(_Validated):
    """every: save every that many optimizer steps (0: only at the end); keep_last: checkpoints kept
    (older ones are deleted after a new one is complete); resume: None, "auto" (latest checkpoint in
    `output_dir/checkpoints`, if any) or a checkpoint directory; save_final: save after the last step."""

    every: int = 0
    keep_last: int = 2
    resume: str | None = None
    save_final: bool = True

    def _validate(self) -> None:
        _check(self.every >= 0, f"checkpoint.every must be >= 0, got {self.every}")
        _check(self.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


@dataclass
class LoggingConfig(_Validated):
    """every: log (and synchronise statistics to the host) every that many optimizer steps;
    jsonl: append records to `output_dir/log.jsonl`; tensorboard: write `output_dir/tensorboard`;
    progress_bar: tqdm bar on rank 0; peak_tflops: accelerator peak (dense bf16) for the MFU estimate
    (None: looked up from the CUDA device name, no MFU on CPU)."""

    every: int = 10
    jsonl: bool = True
    tensorboard: bool = False
    progress_bar: bool = True
    peak_tflops: float | None = None

    def _validate(self) -> None:
        _check(self.every >= 1, f"logging.every must be >= 1, got {self.every}")
        _check(self.peak_tflops is None or self.peak_tflops > 0, "logging.peak_tflops must be > 0 or None")


@dataclass
class ParallelConfig(_Validated):
    """How the processes launched by torchrun split the work (the model code stays single-device).

    data_parallel: "none", "ddp" (DistributedDataParallel) or "fsdp" (FSDP2 `fully_shard`), over all
        processes. A plain string `parallel: fsdp` means `parallel: {data_parallel: fsdp}`.
    context_parallel: C > 1 splits every sequence into C contiguous shards over groups of C consecutive
        ranks (Ulysses all-to-all around both attention branches, `l2a.training.context_parallel`); the
        world size must be a multiple of C, C must divide the query heads and divide (or be a multiple
        of) the KV heads, and `data.seq_len` must be a multiple of C. L2A models only.
    """

    data_parallel: Literal["none", "ddp", "fsdp"] = "none"
    context_parallel: int = 1

    def _validate(self) -> None:
        _check(
            self.context_parallel >= 1,
            f"parallel.context_parallel must be >= 1, got {self.context_parallel}",
        )


SECTION_SHORTHANDS = {"parallel": "data_parallel"}
"""Sections that may be written as one scalar, meaning this field of theirs (`parallel: fsdp`)."""


@dataclass
class TrainConfig(_Validated):
    """Everything `l2a.training.train` needs.

    model: directory written by `l2a convert` / `save_pretrained` (only read by `run_training` / the CLI).
    output_dir: checkpoints, `log.jsonl`, TensorBoard files.
    steps: optimizer steps; grad_accum_steps: micro-steps per optimizer step (per rank).
    trainable: named groups (`TRAINABLE_GROUPS`) and/or glob patterns on parameter names; everything
        else gets requires_grad=False and stays out of the optimizer. Default as the paper.
    rope_theta, max_position_embeddings: context extension applied to the model before training.
    device: "cpu", "cuda" (under torchrun: the process's `LOCAL_RANK` GPU) or "cuda:N";
        None = "cuda" when available, else "cpu".
    precision: "auto" = bf16 on CUDA, fp32 on CPU. bf16 is autocast (DDP / one device) or FSDP2's
        MixedPrecisionPolicy over the model's own weights (fp32 when loaded by `run_training`).
    gradient_checkpointing: activation checkpointing of every decoder layer (HF
        `activation_checkpointing_enable` / `gradient_checkpointing_enable`, non-reentrant).
    parallel: a `ParallelConfig` (data and context parallelism under torchrun), or its shorthand
        "none" / "ddp" / "fsdp".
    activation_offload: keep the tensors saved for the backward (with `gradient_checkpointing`: the layer
        inputs, 1 GiB per layer for Qwen3-8B at 128K tokens) in (pinned) host memory instead of on the device
        (`torch.autograd.graph.save_on_cpu`); costs a copy each way per step.
    frozen_precision: "same" keeps the frozen parameters as loaded; "bf16" stores them in bfloat16 (they
        never update, so fp32 copies only cost memory: 2 bytes per parameter saved, e.g. 13 GiB for Qwen3-8B's
        MLPs and embeddings). The residual stream then runs in bf16 too. Needs precision bf16; not with FSDP
        over several processes (FSDP2 keeps one dtype per shard group; it shards the fp32 copies instead).
    loss_impl: LM loss: "plain" (full logits, the model's own loss), "liger" (Liger-Kernel's fused linear
        cross-entropy, CUDA), "chunked" (exact PyTorch, chunked over tokens) or "auto" (liger on CUDA when
        installed, else chunked); logged at start.
    """

    model: str | None = None
    output_dir: str = "runs/train"
    steps: int = 100
    grad_accum_steps: int = 1
    seed: int = 0
    trainable: list[str] = field(default_factory=lambda: ["attention", "norms", "router"])
    rope_theta: float | None = None
    max_position_embeddings: int | None = None
    device: str | None = None
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    gradient_checkpointing: bool = False
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    activation_offload: bool = False
    frozen_precision: Literal["same", "bf16"] = "same"
    loss_impl: Literal["auto", "liger", "chunked", "plain"] = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def _validate(self) -> None:
        # Sections may be given as mappings (`checkpoint={"every": 10}`): build and validate them here.
        hints = get_type_hints(type(self))
        for name in ("data", "optim", "router", "checkpoint", "logging", "parallel"):
            setattr(self, name, _coerce(getattr(self, name), hints[name], name))
        _check(
            self.device is None
            or self.device == "cpu"
            or re.fullmatch(r"cuda(:\d+)?", self.device) is not None,
            f"device must be None, 'cpu', 'cuda' or 'cuda:N', got {self.device!r}",
        )
        _check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _check(self.grad_accum_steps >= 1, f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        _check(len(self.trainable) > 0, "trainable must name at least one group or pattern")
        _check(
            self.rope_theta is None or self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}"
        )
        _check(
            self.max_position_embeddings is None or self.max_position_embeddings >= 1,
            f"max_position_embeddings must be >= 1, got {self.max_position_embeddings}",
        )
        _check(
            self.frozen_precision == "same" or self.precision == "bf16",
            f"frozen_precision='bf16' needs precision='bf16', got {self.precision!r}",
        )
        _check(
            self.data.seq_len % self.parallel.context_parallel == 0,
            f"data.seq_len={self.data.seq_len} must be a multiple of "
            f"parallel.context_parallel={self.parallel.context_parallel}",
        )
        _check(
            self.optim.warmup_steps <= self.steps,
            f"optim.warmup_steps={self.optim.warmup_steps} exceeds steps={self.steps}",
        )
        _check(
            self.router.router_only_steps <= self.steps,
            f"router.router_only_steps={self.router.router_only_steps} exceeds steps={self.steps}",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        return _build(cls, values, prefix="")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, name)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError(f"{name}: cannot use {value!r} ({'; '.join(errors)})")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{name} must have {len(args)} entries, got {value!r}")
            return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return origin(_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        shorthand = SECTION_SHORTHANDS.get(name)
        if shorthand is not None and not isinstance(value, dict):
            value = {shorthand: value}
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {value!r}")
        return _build(tp, value, prefix=f"{name}.")
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        try:
            out = float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
        if math.isnan(out):
            raise ValueError(f"{name} must not be NaN")
        return out
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"{name}: unsupported field type {tp!r}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        key = unknown[0]
        hint = did_you_mean(key, names, prefix)
        where = f" of section {prefix[:-1]!r}" if prefix else ""
        raise ValueError(
            f"unknown config key {prefix + key!r}{hint} (valid keys{where}: {', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(error, 'problem', None) or error}{where}"


def _read_file(path: Path) -> dict[str, Any]:
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml"):
        raise ValueError(f"config file {str(path)!r} must end in .yaml, .yml or .toml")
    if not path.exists():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} is not a file")
    text = path.read_text()
    if suffix == ".toml":
        import tomllib

        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {error}") from None
    else:
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(error)}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    return values


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` strings to a nested dict (values parsed as YAML: `1e-4`, `[a, b]`, `null`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        node = values
        parts = key.strip().split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if depth == 0 and part in SECTION_SHORTHANDS and not isinstance(child, dict):
                child = node[part] = {SECTION_SHORTHANDS[part]: child}
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ValueError(
                f"override {item!r}: the value is not valid YAML ({_yaml_problem(error)})"
            ) from None
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML/TOML file (or start from defaults when `path` is None) and apply dotted overrides."""
    values = _read_file(Path(path)) if path is not None else {}
    apply_overrides(values, list(overrides or []))
    return TrainConfig.from_dict(values)
