"""The reproduction's models and scoring (`l2a.experiments.reproduction`): the base model, loading and
saving, teacher-forced task scores, an arm's evaluation at every length and the KV-cache bytes."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import torch

from l2a.data.tasks import TaskSample
from l2a.evaluation.perplexity import perplexity_by_position
from l2a.evaluation.speed import kv_cache_bytes
from l2a.evaluation.teacher_forced import score_teacher_forced
from l2a.experiments.config import ReproductionConfig
from l2a.experiments.reproduction_data import Corpus, eval_samples


# --------------------------------------------------------------------------------------------- models
def build_base_model(config: ReproductionConfig, tokenizer: Any) -> torch.nn.Module:
    """A freshly initialised `Qwen3ForCausalLM` of `config.model` over the byte tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    m = config.model
    base_config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads,
        head_dim=m.hidden_size // m.num_heads,
        max_position_embeddings=config.data.seq_len,
        rope_theta=m.rope_theta,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    base_config._attn_implementation = "sdpa"
    return Qwen3ForCausalLM(base_config)


def _load_base(root: Path, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32).to(device)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (as training); fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _save_bf16(model: torch.nn.Module, tokenizer: Any, path: Path) -> None:
    """Save a bf16 copy (half the bytes: a 30M-parameter model is 60 MB) with the tokenizer."""
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)


# ----------------------------------------------------------------------------------------- evaluation
def score_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    samples: dict[str, list[TaskSample]],
    config: ReproductionConfig,
) -> dict[str, dict[str, Any]]:
    """Per task: mean teacher-forced ``score`` (0–100), ``beyond_window_score`` (samples whose earliest
    needle lies more than the window before the prompt's end; None when none does), and the mean
    per-layer ``routed_fraction`` (None for a model without routers)."""
    device = next(model.parameters()).device
    window = config.extend.window
    out = {}
    for name, batch in samples.items():
        with _autocast(device):
            scored = score_teacher_forced(
                model,
                tokenizer,
                batch,
                batch_size=config.eval.batch_size,
                pad_token_id=tokenizer.pad_token_id,
            )
        far = [s.score for s in scored if s.needle_distance is not None and s.needle_distance > window]
        fractions = [s.routed_fraction for s in scored if s.routed_fraction is not None]
        out[name] = {
            "score": sum(s.score for s in scored) / len(scored),
            "beyond_window_score": sum(far) / len(far) if far else None,
            "beyond_window_samples": len(far),
            "samples": len(scored),
            "routed_fraction": torch.tensor(fractions).mean(0).tolist() if fractions else None,
        }
    return out


def _sparsity(arm: str, routed: list[float] | None) -> float:
    if routed is None:
        return 0.0 if arm in ("clp", "base") else 1.0
    return 1.0 - sum(routed) / len(routed) if routed else 1.0


def evaluate_arm(
    arm: str, model: torch.nn.Module, tokenizer: Any, config: ReproductionConfig, corpus: Corpus, log: Any
) -> dict[str, Any]:
    """Task rows at every evaluation length and perplexity by position at the largest one."""
    rows = []
    for length in config.eval_lengths:
        log(f"[{arm}] evaluating {len(config.eval_tasks)} task(s) x {config.eval.samples} at length {length}")
        for task, result in score_tasks(
            model, tokenizer, eval_samples(config, length, config.eval.samples, "eval"), config
        ).items():
            rows.append(
                {
                    "arm": arm,
                    "length": length,
                    "task": task,
                    "score": result["score"],
                    "sparsity": _sparsity(arm, result["routed_fraction"]),
                    "beyond_window_score": result["beyond_window_score"],
                    "beyond_window_samples": result["beyond_window_samples"],
                    "samples": result["samples"],
                    "routed_fraction": result["routed_fraction"],
                }
            )
    longest = max(config.eval_lengths)
    with _autocast(next(model.parameters()).device):
        ppl = perplexity_by_position(
            model, tokenizer, corpus.heldout_texts, longest, max_sequences=config.eval.perplexity_windows
        )
    return {"rows": rows, "perplexity": {"arm": arm, **ppl.to_dict()}}


def _kv_bytes(model: torch.nn.Module, sample: TaskSample) -> int:
    """Bytes of the KV cache after a prefill of one prompt (measured on the cache the model returns)."""
    from l2a.models._compat import CACHE_FIELD

    device = next(model.parameters()).device
    ids = torch.tensor([sample.input_ids], device=device)
    with torch.no_grad(), _autocast(device):
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return kv_cache_bytes(getattr(out, CACHE_FIELD))
