"""One evaluation run over several models: load, evaluate tasks / perplexity / routing / speed, report.

This is what ``l2a eval`` calls. Routing variants of one L2A checkpoint are separate loads with
``config.force_route`` overridden: "l2a" or "learned" (learned routing; the two names are one variant),
"local_only" (global attention off: window attention only) and "all_global" (every token, or for AHA
every (token, head) pair, routed: the dense reference).
"""

from __future__ import annotations

import difflib
import gc
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from l2a.data.corpora import iter_documents
from l2a.data.tasks import TASKS
from l2a.data.tokenization import load_tokenizer
from l2a.evaluation.common import format_length, is_l2a_model, model_device
from l2a.evaluation.perplexity import perplexity_by_position, position_buckets
from l2a.evaluation.report import ModelEvaluation, write_report
from l2a.evaluation.routing import routing_analysis
from l2a.evaluation.speed import measure_speed
from l2a.evaluation.tasks import build_task, evaluate_tasks, sample_tasks

Variant = Literal["l2a", "learned", "local_only", "all_global"]
VARIANTS: dict[str, str | None] = {"l2a": None, "learned": None, "local_only": "none", "all_global": "all"}
"""Variant name → ``config.force_route``."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EvalSettings:
    """What to measure. Lengths are in tokens; ``perplexity_seq_len`` None means the largest task length.

    ``task_args`` maps a task of ``tasks`` to keyword overrides of its defaults, e.g.
    ``{"kv_retrieval": {"key_chars": 2, "value_digits": 2}}`` (``l2a eval --task-arg``).
    """

    tasks: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    samples: int = 10
    seed: int = 0
    perplexity: bool = False
    perplexity_data: str = "stdlib"
    perplexity_seq_len: int | None = None
    perplexity_windows: int = 8
    perplexity_spacing: Literal["log", "linear"] = "log"
    routing: bool = True
    routing_texts: int = 4
    speed: bool = False
    speed_lengths: list[int] = field(default_factory=list)
    decode_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    progress: bool = True
    task_args: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [name for name in self.tasks if name not in TASKS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(TASKS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown task(s) {unknown}{hint} (known tasks: {', '.join(TASKS)})")
        if self.tasks and not self.lengths:
            raise ValueError("tasks need at least one length")
        stray = [name for name in self.task_args if name not in self.tasks]
        if stray:
            raise ValueError(f"task arguments given for {stray}, which are not among the tasks {self.tasks}")
        for name, overrides in self.task_args.items():
            build_task(name, overrides)  # fail now, not after loading the first model
        if self.samples < 1:
            raise ValueError(f"samples must be positive, got {self.samples}")
        if self.perplexity and self.perplexity_seq_len is None and not self.lengths:
            raise ValueError("perplexity needs perplexity_seq_len or task lengths")
        if self.speed and not (self.speed_lengths or self.lengths):
            raise ValueError("speed needs speed_lengths or task lengths")
        if not (self.tasks or self.perplexity or self.speed):
            raise ValueError("nothing to evaluate: give tasks, perplexity=True or speed=True")


def check_variants(variants: Sequence[str]) -> None:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"variants must be a non-empty subset of {list(VARIANTS)}, got {list(variants)}")


def check_settings(settings: EvalSettings, tokenizer: str) -> None:
    """Fail before any model loads when a task's prompt cannot fit the shortest length: draws one prompt
    per task at that length with ``tokenizer`` (a path or "byte"; cheap at the shortest length)."""
    if settings.tasks:
        sample_tasks(
            load_tokenizer(tokenizer),
            settings.tasks,
            [min(settings.lengths)],
            1,
            settings.seed,
            task_args=settings.task_args,
        )


def resolve_device(device: str) -> torch.device:
    """ "auto" → cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {device!r} requested but there are {torch.cuda.device_count()} CUDA devices"
        )
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """ "auto" → bfloat16 on CUDA, float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_model(
    path: str | Path, *, force_route: str | None = None, device: torch.device, dtype: torch.dtype
) -> torch.nn.Module:
    """Load a causal LM for evaluation (L2A or any HF model), optionally overriding ``config.force_route``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import l2a.models  # noqa: F401  (registers model_type "l2a" with the Auto classes)

    config = AutoConfig.from_pretrained(path)
    if force_route is not None:
        if config.model_type != "l2a":
            raise ValueError(
                f"force_route={force_route!r} needs an L2A model; {path} has model_type={config.model_type!r}"
            )
        config.force_route = force_route
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    return model.to(device).eval()


def model_info(model: torch.nn.Module, path: str | Path | None, variant: str | None) -> dict[str, Any]:
    """Facts about the evaluated model recorded in ``results.json``."""
    config = model.config
    info: dict[str, Any] = {
        "path": None if path is None else str(path),
        "model_type": config.model_type,
        "variant": variant,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(model_device(model)),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "num_hidden_layers": config.num_hidden_layers,
    }
    if is_l2a_model(model):
        info |= {
            "method": config.method,
            "force_route": config.force_route,
            "sliding_window": config.sliding_window,
            "global_layers": list(config.global_layers),
        }
        if config.method == "aha":
            info["routed_heads"] = [list(heads) for heads in config.routed_heads]
    return info


def _documents(settings: EvalSettings) -> Iterator[str]:
    """Documents of the perplexity corpus in a seeded shuffled order (a small buffer: the order only
    needs to vary between files, not to be a uniform shuffle)."""
    return iter_documents(settings.perplexity_data, shuffle_seed=settings.seed, shuffle_buffer=64)


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    settings: EvalSettings,
    label: str,
    info: dict[str, Any] | None = None,
) -> ModelEvaluation:
    """Run everything ``settings`` asks for on one loaded model."""
    result = ModelEvaluation(label=label, info=info if info is not None else model_info(model, None, None))
    if settings.tasks:
        result.tasks = evaluate_tasks(
            model,
            tokenizer,
            settings.tasks,
            settings.lengths,
            settings.samples,
            settings.seed,
            progress=settings.progress,
            task_args=settings.task_args,
        )
    if settings.perplexity:
        seq_len = settings.perplexity_seq_len or max(settings.lengths)
        texts = _documents(settings)
        result.perplexity.append(
            perplexity_by_position(
                model,
                tokenizer,
                texts,
                seq_len,
                position_buckets(seq_len, settings.perplexity_spacing),
                max_sequences=settings.perplexity_windows,
                progress=settings.progress,
            )
        )
    if settings.routing and is_l2a_model(model) and model.config.force_route is None:
        samples = []
        if settings.tasks:
            drawn = sample_tasks(
                tokenizer, settings.tasks, settings.lengths, 1, settings.seed, task_args=settings.task_args
            )
            samples = [batch[0] for batch in drawn.values()]
        text_len = settings.perplexity_seq_len or (max(settings.lengths) if settings.lengths else None)
        texts = []
        if settings.routing_texts:
            texts = list(itertools.islice(_documents(settings), settings.routing_texts))
        if samples or texts:
            result.routing = routing_analysis(
                model, tokenizer, samples, texts=texts, text_len=text_len, progress=settings.progress
            )
    if settings.speed:
        result.speed = measure_speed(
            model,
            settings.speed_lengths or settings.lengths,
            decode_tokens=settings.decode_tokens,
            repeats=settings.repeats,
            warmup=settings.warmup,
            seed=settings.seed,
            progress=settings.progress,
        )
    return result


def _labels(paths: Sequence[str | Path]) -> list[str]:
    names = [Path(p).name or str(p) for p in paths]
    if len(set(names)) != len(names):
        names = [f"{i}:{name}" for i, name in enumerate(names)]
    return names


def run_evaluation(
    model_paths: Sequence[str | Path],
    settings: EvalSettings,
    *,
    out_dir: str | Path,
    variants: Sequence[str] = ("l2a",),
    tokenizer: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> list[ModelEvaluation]:
    """Evaluate every model (and every routing variant of L2A models), then write the report to ``out_dir``.

    Args:
        model_paths: directories (or hub names available locally) of L2A or plain HF causal LMs.
        variants: names from `VARIANTS`; applied to L2A models (plain models are evaluated once, as they are).
        tokenizer: tokenizer path/name, or "byte"; default: each model's own directory.
    """
    if not model_paths:
        raise ValueError("give at least one model")
    check_variants(variants)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    results = []
    for path, name in zip(model_paths, _labels(model_paths)):
        from transformers import AutoConfig

        import l2a.models  # noqa: F401

        is_l2a = AutoConfig.from_pretrained(path).model_type == "l2a"
        tok = load_tokenizer(tokenizer or str(path))
        for variant in variants if is_l2a else [None]:
            label = (
                name if variant in (None, "l2a") and len(variants) == 1 else f"{name} [{variant or 'base'}]"
            )
            model = load_model(
                path,
                force_route=VARIANTS[variant] if variant else None,
                device=torch_device,
                dtype=torch_dtype,
            )
            results.append(evaluate_model(model, tok, settings, label, model_info(model, path, variant)))
            del model
            gc.collect()
            if torch_device.type == "cuda":
                torch.cuda.empty_cache()
    report_settings = asdict(settings) | {
        "models": [str(p) for p in model_paths],
        "variants": list(variants),
        "tokenizer": tokenizer,
        "device": str(torch_device),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "lengths": [format_length(n) for n in settings.lengths],
    }
    write_report(results, out_dir, report_settings)
    return results
