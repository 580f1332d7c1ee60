"""Speed and memory: time-to-first-token (prefill), decode throughput, peak memory and KV-cache size.

On CUDA the figures are real: host timers read after ``torch.cuda.synchronize`` and the peak of
``torch.cuda.max_memory_allocated``. On CPU the same code runs (small sizes, for testing); peak memory is
reported as n/a there because PyTorch's CPU allocator has no peak counter.
"""

from __future__ import annotations

import platform
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from l2a.evaluation.common import model_device, synchronize, timer
from l2a.models._compat import cache_kwargs, output_cache


def kv_cache_bytes(cache: Any) -> int:
    """Bytes held by a KV cache.

    Uses the cache's own ``nbytes()`` when it has one (`l2a.models.L2ACache`); otherwise sums the key and
    value tensors of an HF ``Cache`` (``cache.layers[i].keys/values``) or of a legacy tuple of tuples.
    """
    if cache is None:
        raise ValueError("the model returned no KV cache; was use_cache=True honoured?")
    if callable(getattr(cache, "nbytes", None)):
        return int(cache.nbytes())
    if hasattr(cache, "layers"):
        total = 0
        for layer in cache.layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name, None)
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total
    if isinstance(cache, (tuple, list)):
        return sum(
            kv_cache_bytes(item) if not isinstance(item, torch.Tensor) else item.nbytes for item in cache
        )
    raise TypeError(f"cannot measure the size of a cache of type {type(cache).__name__}")


@dataclass
class SpeedPoint:
    """Figures at one prompt length (batch ``SpeedReport.batch_size``)."""

    length: int
    prefill_ms: float
    prefill_tokens_per_s: float
    decode_ms_per_step: float
    decode_tokens_per_s: float
    kv_cache_bytes: int
    peak_memory_bytes: int | None


@dataclass
class SpeedReport:
    """Speed and memory at several lengths; medians over ``repeats`` runs after ``warmup`` runs."""

    device: str
    dtype: str
    batch_size: int
    decode_tokens: int
    repeats: int
    warmup: int
    model_bytes: int
    memory_measure: str
    points: list[SpeedPoint] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _environment(device: torch.device) -> dict[str, str]:
    import transformers

    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = str(torch.version.cuda)
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = str(torch.get_num_threads())
    return env


@torch.no_grad()
def _run_once(
    model: torch.nn.Module, input_ids: torch.Tensor, decode_tokens: int, device: torch.device
) -> tuple[float, float, int]:
    """One prefill and ``decode_tokens`` greedy steps; returns (prefill s, decode s, cache bytes)."""
    start = timer(device)
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    prefill_end = timer(device)
    cache = output_cache(out)
    cache_bytes = kv_cache_bytes(cache)
    token = out.logits[:, -1:].argmax(-1)
    decode_start = timer(device)
    for _ in range(decode_tokens):
        out = model(input_ids=token, use_cache=True, **cache_kwargs(cache))
        cache = output_cache(out)
        token = out.logits[:, -1:].argmax(-1)
    decode_end = timer(device)
    return prefill_end - start, decode_end - decode_start, cache_bytes


def measure_speed(
    model: torch.nn.Module,
    lengths: Sequence[int],
    *,
    batch_size: int = 1,
    decode_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> SpeedReport:
    """Prefill time (time-to-first-token), decode throughput, KV-cache bytes and peak memory.

    Prompts are random token ids (speed does not depend on the text). Decode continues greedily from
    the prefill cache, one token per step. The KV-cache size is read after the prefill.

    Args:
        model: HF causal LM (forward accepts ``use_cache``, ``past_key_values``, ``logits_to_keep``).
        lengths: prompt lengths N.
        batch_size: prompts per forward (B).
        decode_tokens: decode steps timed after each prefill (0 skips decode timing).
        repeats, warmup: timed and untimed runs per length; reported figures are medians.
    """
    if not lengths or any(n < 1 for n in lengths):
        raise ValueError(f"lengths must be a non-empty list of positive ints, got {list(lengths)}")
    for name, value, low in (("batch_size", batch_size, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if decode_tokens < 0:
        raise ValueError(f"decode_tokens must be >= 0, got {decode_tokens}")
    device = model_device(model)
    dtype = next(model.parameters()).dtype
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    model_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    report = SpeedReport(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        batch_size=batch_size,
        decode_tokens=decode_tokens,
        repeats=repeats,
        warmup=warmup,
        model_bytes=model_bytes,
        memory_measure="torch.cuda.max_memory_allocated" if device.type == "cuda" else "n/a (CPU)",
        environment=_environment(device),
    )
    was_training = model.training
    model.eval()
    try:
        for length in tqdm(lengths, desc="speed", disable=not progress, leave=False):
            input_ids = torch.randint(0, vocab, (batch_size, length), generator=generator).to(device)
            for _ in range(warmup):
                _run_once(model, input_ids, min(decode_tokens, 2), device)
            if device.type == "cuda":
                synchronize(device)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            runs = [_run_once(model, input_ids, decode_tokens, device) for _ in range(repeats)]
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            prefill_s = statistics.median(r[0] for r in runs)
            decode_s = statistics.median(r[1] for r in runs)
            decoded = batch_size * decode_tokens
            report.points.append(
                SpeedPoint(
                    length=length,
                    prefill_ms=prefill_s * 1e3,
                    prefill_tokens_per_s=batch_size * length / prefill_s,
                    decode_ms_per_step=decode_s * 1e3 / decode_tokens if decode_tokens else float("nan"),
                    decode_tokens_per_s=decoded / decode_s if decode_tokens else float("nan"),
                    kv_cache_bytes=runs[-1][2],
                    peak_memory_bytes=peak,
                )
            )
    finally:
        model.train(was_training)
    return report
