"""The training loop: `train(model, tokenizer, config, data=...)` and `run_training(config)` (the CLI's).

One optimizer step = `config.grad_accum_steps` micro-steps per rank. Per step the loop
1. fetches the micro-batches, counts their predicted tokens (labels ≠ -100 after the causal shift) and
   sums the count over ranks, so the LM loss is the token-weighted mean over the whole global batch
   (2 ranks × k micro-steps gives the same gradient as 1 rank × 2k);
2. computes λ(step) and the leakage draw (seeded by (seed, step): the same on every rank, reproduced on
   resume) and runs `model(..., global_leakage=leak)` on each micro-batch;
3. backpropagates `lm_sum / (count / world) + λ · C · router_regularizer / grad_accum_steps` (`lm_sum`: the
   micro-batch's summed LM loss, via the model's `num_items_in_batch`; C: the context-parallel ranks sharing a
   sequence, 1 without), clips, steps AdamW and the LambdaLR schedule. Statistics stay on the device until a
   log step.

The LM loss is computed without full-vocabulary logits unless `loss_impl: plain`
(`l2a.ops.linear_cross_entropy`; plain HF models through `l2a.training.loss.fused_lm_loss`). With
`parallel.context_parallel` C > 1 each rank trains on its shard of every sequence
(`l2a.training.context_parallel`).

Models without a router (e.g. HF `Qwen3ForCausalLM` for pretraining a baseline) work too: their `loss`
is the LM loss and the regulariser is 0; no leakage is drawn.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from l2a.ops.linear_cross_entropy import resolve_loss_impl
from l2a.training import checkpoint as ckpt
from l2a.training.config import TrainConfig
from l2a.training.context_parallel import apply_context_parallel
from l2a.training.loss import fused_lm_loss
from l2a.training.metrics import (
    LogWriter,
    StepStats,
    attention_pairs,
    flops_coefficients,
    peak_flops,
    routing_collapse,
    switched_off_layers,
)
from l2a.training.parallel import (
    DistInfo,
    all_reduce_sum,
    full_model_state,
    init_distributed,
    load_optimizer_state,
    optimizer_state,
    unwrap,
    wrap_model,
)
from l2a.training.params import classify_parameter, set_trainable
from l2a.training.schedules import leakage_draw, lr_factor, regularizer_weight

BATCH_KEYS = ("input_ids", "labels", "position_ids", "cu_seqlens", "attention_mask")
"""Keys a batch may hold: `input_ids` (B, N) or (N,); `labels` (default: `input_ids`, -100 = ignored,
shifted inside the model as in HF); `position_ids` (B, N); `cu_seqlens` (num_docs + 1) for a packed row
(B = 1); `attention_mask` (B, N)."""


@dataclass
class TrainResult:
    """step: optimizer steps completed; history: the log records (dicts as in `log.jsonl`);
    checkpoint: the last checkpoint written (None if none); data_exhausted: the data ran out before
    `config.steps`."""

    step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None
    output_dir: Path | None = None
    data_exhausted: bool = False
    loss_impl: str | None = None


def apply_context_extension(
    model: nn.Module, rope_theta: float | None, max_position_embeddings: int | None
) -> None:
    """Set RoPE θ / max positions in `model.config` and rebuild the rotary embedding modules from it.

    Every submodule holding an `inv_freq` buffer and a `config` is re-created as `type(m)(config=config)`
    (HF's and L2A's rotary embeddings compute their frequencies from the config at construction).
    """
    if rope_theta is None and max_position_embeddings is None:
        return
    config = model.config
    if rope_theta is not None:
        params = dict(config.rope_parameters or {})
        params["rope_theta"] = float(rope_theta)
        config.rope_parameters = params
    if max_position_embeddings is not None:
        config.max_position_embeddings = int(max_position_embeddings)
    rebuilt = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if hasattr(child, "inv_freq") and hasattr(child, "config"):
                device = child.inv_freq.device
                setattr(parent, name, type(child)(config=config).to(device))
                rebuilt += 1
    if rebuilt == 0:
        raise ValueError(
            f"{type(model).__name__} has no rotary embedding module (a submodule with `inv_freq` and "
            "`config`) to rebuild for the new rope_theta / max_position_embeddings"
        )


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether `model.forward` takes `name` (L2A models always do, also behind `**kwargs` wrappers)."""
    if getattr(getattr(model, "config", None), "model_type", None) == "l2a":
        return True
    return name in inspect.signature(model.forward).parameters


def _prepare(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    unknown = sorted(set(batch) - set(BATCH_KEYS))
    if unknown:
        raise ValueError(f"batch has unknown keys {unknown}; allowed: {list(BATCH_KEYS)}")
    if "input_ids" not in batch:
        raise ValueError("batch has no 'input_ids'")
    out = {}
    for key, value in batch.items():
        tensor = torch.as_tensor(value)
        if key in ("input_ids", "labels", "position_ids", "attention_mask") and tensor.dim() == 1:
            tensor = tensor.unsqueeze(0)
        out[key] = tensor.to(device, non_blocking=True)
    if "labels" not in out:
        out["labels"] = out["input_ids"]
    if "cu_seqlens" in out:
        if out["input_ids"].shape[0] != 1:
            raise ValueError(
                f"a batch with cu_seqlens must have one row, got input_ids {tuple(out['input_ids'].shape)}"
            )
        out["cu_seqlens"] = out["cu_seqlens"].to(torch.int32)
    return out


def _predicted_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Positions with a next-token target (labels != -100 after the causal shift), float64 on the device."""
    if "shift_labels" in batch:
        return (batch["shift_labels"] != -100).sum().to(torch.float64)
    return (batch["labels"][:, 1:] != -100).sum().to(torch.float64)


def _autocast(info: DistInfo, bf16: bool, fsdp: bool) -> contextlib.AbstractContextManager:
    # FSDP2 casts parameters itself (MixedPrecisionPolicy); elsewhere autocast keeps fp32 master weights.
    if bf16 and not fsdp:
        return torch.autocast(device_type=info.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _saved_tensors(config: TrainConfig, info: DistInfo) -> contextlib.AbstractContextManager:
    if config.activation_offload:
        return torch.autograd.graph.save_on_cpu(pin_memory=info.device.type == "cuda")
    return contextlib.nullcontext()


class _DataStream:
    """Iterator over micro-batches that records its position for checkpoints.

    Uses the source's own `state_dict()` / `load_state_dict()` when it has them; otherwise resuming
    re-iterates the source and skips the micro-batches already consumed.
    """

    def __init__(self, source: Iterable[dict[str, Any]]):
        self.source = source
        self.stateful = hasattr(source, "state_dict") and hasattr(source, "load_state_dict")
        self.consumed = 0
        self._it: Iterator[dict[str, Any]] | None = None

    def _iterator(self) -> Iterator[dict[str, Any]]:
        if self._it is None:
            self._it = iter(self.source)
        return self._it

    def next(self) -> dict[str, Any] | None:
        try:
            batch = next(self._iterator())
        except StopIteration:
            return None
        self.consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"consumed": self.consumed}
        if self.stateful:
            state["source"] = self.source.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed = state["consumed"]
        if self.stateful:
            self.source.load_state_dict(state["source"])
            return
        it = self._iterator()
        for i in range(self.consumed):
            try:
                next(it)
            except StopIteration:
                raise ValueError(
                    f"resume: the data ran out after {i} micro-batches while skipping {self.consumed}"
                ) from None


def _resolve_resume(config: TrainConfig, root: Path) -> Path | None:
    resume = config.checkpoint.resume
    if resume is None:
        return None
    if resume == "auto":
        return ckpt.latest_good_checkpoint(root)
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint.resume={resume!r} is not a checkpoint directory")
    ckpt.check_checkpoint(path)
    return path


def _optimizer(model: nn.Module, config: TrainConfig, fsdp: bool) -> torch.optim.AdamW:
    o = config.optim
    decay, no_decay, router = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if o.router_lr_scale != 1.0 and classify_parameter(name) == "router":
            router.append(param)
        else:
            # Norm gains and biases (1-D) are not decayed, as usual.
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": o.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if router:  # LambdaLR scales each group's own initial lr, so the ratio holds over the schedule
        groups.append({"params": router, "weight_decay": o.weight_decay, "lr": o.lr * o.router_lr_scale})
    # the fused CUDA kernel: no full-size temporaries (foreach AdamW's would be GiBs for billions of weights)
    fused = (not fsdp and all(p.is_cuda for group in groups for p in group["params"])) or None
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=fused)


def _held_back_during_router_only(model: nn.Module, steps: int) -> list[nn.Parameter]:
    """Trainable non-router parameters, which get no update during the first `steps` (router-only) steps."""
    if steps == 0:
        return []
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not any(classify_parameter(name) == "router" for name, _ in named):
        raise ValueError("router.router_only_steps > 0 needs trainable router parameters (an L2A model)")
    return [p for name, p in named if classify_parameter(name) != "router"]


def train(
    model: nn.Module,
    tokenizer: Any,
    config: TrainConfig,
    *,
    data: Iterable[dict[str, Any]] | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train `model` (an HF causal LM, L2A or not) in place according to `config`.

    Args:
        model: `L2AForCausalLM`, or any HF causal LM returning `loss` (no router: regulariser 0).
            Its dtype is left as given (use fp32 master weights; `precision` controls autocast).
        tokenizer: saved into checkpoints (when it has `save_pretrained`) and used to build the
            config's data stream; may be None when `data` is given.
        config: a `TrainConfig`.
        data: this rank's micro-batches (dicts with `BATCH_KEYS`; every rank must supply as many);
            None builds the stream from `config.data` through `l2a.data`. Training stops early when
            it runs out.
        on_log: called on rank 0 with each log record.

    Returns:
        TrainResult with the log history and the last checkpoint.
    """
    info = init_distributed(config.parallel.data_parallel, config.device)
    try:
        return _train(model, tokenizer, config, data, on_log, info)
    finally:
        if info.created_group:
            torch.distributed.destroy_process_group()


def _train(model, tokenizer, config, data, on_log, info: DistInfo) -> TrainResult:
    output_dir = Path(config.output_dir)
    ckpt_root = output_dir / "checkpoints"
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed + info.rank)

    routed = _accepts(model, "global_leakage")
    packed_ok = _accepts(model, "cu_seqlens")
    loss_impl = resolve_loss_impl(config.loss_impl, info.device)
    cp = apply_context_parallel(model, config.parallel.context_parallel)
    if info.is_main:
        print(
            f"l2a train: loss_impl={config.loss_impl} -> {loss_impl}; world {info.world_size}, "
            f"context parallel {config.parallel.context_parallel}, "
            f"data parallel {config.parallel.data_parallel}",
            file=sys.stderr,
        )
    apply_context_extension(model, config.rope_theta, config.max_position_embeddings)
    set_trainable(model, config.trainable)
    if config.frozen_precision == "bf16":
        if config.parallel.data_parallel == "fsdp" and info.distributed:
            raise ValueError("frozen_precision='bf16' cannot be combined with FSDP over several processes")
        for param in model.parameters():
            if not param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    if config.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
        # Non-reentrant checkpointing: inputs of the first layer come from a frozen embedding (no grad).
        from l2a.models._compat import enable_activation_checkpointing

        enable_activation_checkpointing(model, use_reentrant=False)

    resume_dir = _resolve_resume(config, ckpt_root)
    if config.checkpoint.resume is None and ckpt.list_checkpoints(ckpt_root):
        raise FileExistsError(
            f"{ckpt_root} already holds checkpoints; set checkpoint.resume (auto or a path) to continue "
            "that run, or choose another output_dir"
        )
    if resume_dir is not None:
        missing, unexpected = model.load_state_dict(ckpt.load_model_state(resume_dir), strict=False)
        tied = set(
            getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or []
        )
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {resume_dir} does not match the model: "
                f"missing {missing}, unexpected {unexpected}"
            )

    bf16 = config.precision == "bf16" or (config.precision == "auto" and info.device.type == "cuda")
    fsdp = config.parallel.data_parallel == "fsdp" and info.distributed
    if not fsdp:
        model.to(info.device)
    model.train()
    # fully_shard moves each layer to the device as it shards it: the full model never sits on one GPU.
    wrapped = wrap_model(model, config.parallel.data_parallel, info, bf16=bf16)
    if fsdp:
        wrapped.to(info.device)
    base = unwrap(wrapped)
    optimizer = _optimizer(wrapped, config, fsdp)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.optim, config.steps)
    )
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    held_back = _held_back_during_router_only(wrapped, config.router.router_only_steps)

    if data is None:
        from l2a.training.data import build_batches

        # the ranks of a context-parallel group read the same sequences and keep their shards of them
        c = config.parallel.context_parallel
        data = build_batches(config, tokenizer, rank=info.rank // c, world_size=info.world_size // c)
    stream = _DataStream(data)

    start_step = 0
    if resume_dir is not None:
        state = ckpt.load_trainer_state(resume_dir)
        load_optimizer_state(wrapped, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = state["step"]
        rank_state = ckpt.load_rank_state(resume_dir, info.rank)
        stream.load_state_dict(rank_state["data"])
        ckpt.set_rng_state(rank_state["rng"])

    writer = (
        LogWriter(output_dir, jsonl=config.logging.jsonl, tensorboard=config.logging.tensorboard)
        if info.is_main
        else None
    )
    flops_per_token, flops_per_pair = flops_coefficients(base)
    peak = peak_flops(info.device, config.logging.peak_tflops)
    result = TrainResult(step=start_step, output_dir=output_dir, loss_impl=loss_impl)
    stats = StepStats(info.device)
    progress = None
    if info.is_main and config.logging.progress_bar:
        from tqdm.auto import tqdm

        progress = tqdm(total=config.steps, initial=start_step, desc="train", dynamic_ncols=True)

    def save(step: int) -> Path:
        trainer_state = {
            "step": step,
            "optimizer": optimizer_state(wrapped, optimizer),
            "scheduler": scheduler.state_dict(),
        }
        rank_state = {"rng": ckpt.rng_state(), "data": stream.state_dict()}
        return ckpt.save_checkpoint(
            ckpt_root,
            step,
            model=base,
            model_state=full_model_state(wrapped),
            trainer_state=trainer_state if info.is_main else {},
            rank_state=rank_state,
            config=config.to_dict(),
            keep_last=config.checkpoint.keep_last,
            tokenizer=tokenizer,
        )

    warned: set[str] = set()

    def log(step: int, lam: float, lr: float) -> None:
        nonlocal interval_start
        reduced = stats.reduce(info)  # the only host sync: once per log step
        now = time.perf_counter()
        elapsed = now - interval_start
        record: dict[str, Any] = {
            "step": step,
            "loss": reduced["lm_loss"] + lam * reduced["router_regularizer"],
            **reduced,
            "lambda": lam,
            "lr": lr,
            "tokens_per_s": stats.tokens / elapsed if elapsed > 0 else float("nan"),
            "loss_impl": loss_impl,
        }
        if peak is not None and elapsed > 0:
            record["mfu"] = stats.flops / elapsed / (peak * info.world_size)
        if routed:
            record["global_layers"] = list(getattr(base.config, "global_layers", []))
        if routed and "sparsity_per_layer" in record and getattr(base.config, "force_route", None) is None:
            weight = config.router.regularizer_weight
            collapse = routing_collapse(record["sparsity_per_layer"], weight > 0 and lam >= weight)
            if collapse is not None and config.router.collapse != "ignore":
                record["routing_collapse"] = collapse
                where = ""
                if collapse == "layers_off":
                    layers = record.get("global_layers") or list(range(len(record["sparsity_per_layer"])))
                    off = [layers[i] for i in switched_off_layers(record["sparsity_per_layer"])]
                    where = f" (layers {off} route no token before λ reached its final value)"
                message = (
                    f"routing collapsed at step {step}: {collapse}{where} "
                    f"(router.collapse={config.router.collapse})"
                )
                if config.router.collapse == "stop":
                    raise RuntimeError(message)
                if collapse not in warned:  # once per kind; later records still carry the flag
                    warned.add(collapse)
                    warnings.warn(message, RuntimeWarning, stacklevel=2)
        stats.reset()
        interval_start = now
        if info.is_main:
            result.history.append(record)
            writer.write(record)
            if on_log is not None:
                on_log(record)
            if progress is not None:
                progress.set_postfix(_postfix(record), refresh=False)

    zero = torch.zeros((), device=info.device)
    interval_start = time.perf_counter()
    step = start_step
    # fused LM loss of plain HF models; context-parallel attention (also in backward: recomputation)
    scope = contextlib.ExitStack()
    replicas = cp.size if cp is not None else 1  # ranks holding shards of the same sequences
    try:
        if not routed and loss_impl != "plain":
            scope.enter_context(fused_lm_loss(base, loss_impl))
        if cp is not None:
            scope.enter_context(cp.activate())
        while step < config.steps:
            micro, pairs = [], 0
            for _ in range(config.grad_accum_steps):
                batch = stream.next()
                if batch is None:
                    break
                pairs += attention_pairs(batch)  # on the host copy: no device sync
                mb = _prepare(batch, info.device)
                micro.append(cp.shard(mb) if cp is not None else mb)
            if len(micro) < config.grad_accum_steps:
                result.data_exhausted = True
                break
            for mb in micro:
                if "cu_seqlens" in mb and not packed_ok:
                    raise ValueError(
                        f"{type(base).__name__}.forward takes no cu_seqlens; use unpacked data "
                        "(data.separate_documents=false)"
                    )
            valid = [_predicted_tokens(mb) for mb in micro]
            total_valid = all_reduce_sum(torch.stack(valid).sum(), info).clamp_min(1.0)
            # each rank's LM term is its token sum / (global count / world): the world-mean of the
            # gradients is then that of the global token mean (and a rank without targets adds 0, not NaN)
            num_items = (total_valid / info.world_size).float()
            lam = regularizer_weight(step, config.router, config.steps)
            leak = routed and leakage_draw(config.seed, step, config.router.leakage_probability)
            extra = {"global_leakage": leak, "loss_impl": loss_impl} if routed else {}
            tokens = 0
            for i, mb in enumerate(micro):
                last = i == len(micro) - 1
                sync = (
                    contextlib.nullcontext() if last or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
                )
                with sync:
                    with _autocast(info, bf16, fsdp), _saved_tensors(config, info):
                        out = wrapped(**mb, **extra, num_items_in_batch=num_items)
                    lm = out.lm_loss if routed else out.loss
                    reg = out.router_regularizer if routed else zero
                    # gradients are averaged over all ranks, the regulariser summed over a sequence's shards
                    loss = lm + (lam * replicas / config.grad_accum_steps) * reg
                    loss.backward()
                fraction = out.router_fraction if routed else None
                # per-head fractions (AHA) never meet context parallelism: it refuses non-L2A layers
                head_fraction = getattr(out, "router_head_fraction", None) if routed else None
                if cp is not None and routed:
                    fraction, reg = cp.reduce_statistics(fraction, reg)
                stats.add_micro(lm * num_items, valid[i], reg, fraction, head_fraction)
                tokens += mb["input_ids"].numel() * info.world_size
            if step < config.router.router_only_steps:
                for param in held_back:
                    param.grad = None  # AdamW skips parameters without a gradient: no update, no decay
            max_norm = config.optim.grad_clip if config.optim.grad_clip is not None else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            flops = flops_per_token * tokens + flops_per_pair * pairs * info.world_size / replicas
            stats.add_step(grad_norm, leak, tokens, flops)
            step += 1
            result.step = step

            if step % config.logging.every == 0 or step == config.steps:
                log(step, lam, lr)
            if progress is not None:
                progress.update(1)
            every = config.checkpoint.every
            final = step == config.steps and config.checkpoint.save_final
            if (every and step % every == 0) or final:
                result.checkpoint = save(step)
        if stats.steps:  # the data ran out within a log interval
            log(step, lam, lr)
        saved_now = result.checkpoint is not None and result.checkpoint.name == ckpt.checkpoint_name(step)
        if result.data_exhausted and config.checkpoint.save_final and step > start_step and not saved_now:
            result.checkpoint = save(step)
    finally:
        scope.close()
        if progress is not None:
            progress.close()
        if writer is not None:
            writer.close()
    return result


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    post = {
        "lm": f"{record['lm_loss']:.4f}",
        "reg": f"{record['router_regularizer']:.3g}",
        "λ": f"{record['lambda']:.2g}",
    }
    if "sparsity" in record:
        post["sparsity"] = f"{record['sparsity']:.3f}"
    post["lr"] = f"{record['lr']:.2e}"
    post["gnorm"] = f"{record['grad_norm']:.3f}"
    post["tok/s"] = f"{record['tokens_per_s']:.0f}"
    if "mfu" in record:
        post["mfu"] = f"{record['mfu']:.1%}"
    return post


def run_training(config: TrainConfig) -> TrainResult:
    """Load `config.model` (a directory from `l2a convert` or `save_pretrained`) in fp32 with its tokenizer
    (or `config.data.tokenizer`) and `train` it on the data described by `config.data`."""
    if config.model is None:
        raise ValueError("config.model must name a model directory (from `l2a convert`)")
    from transformers import AutoModelForCausalLM

    import l2a.models  # noqa: F401  (registers the L2A model with the Auto classes)
    from l2a.data import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32)
    tokenizer = load_tokenizer(config.data.tokenizer or config.model)
    return train(model, tokenizer, config)
