"""Training L2A models (and plain HF causal LMs) with the router regulariser and leakage steps.

Programmatic use::

    from l2a.training import CheckpointConfig, LoggingConfig, OptimConfig, RouterConfig, TrainConfig, train

    config = TrainConfig(
        output_dir="runs/l2a",
        steps=200,
        grad_accum_steps=1,
        trainable=["attention", "norms", "router"],  # the paper's default; ["*"] trains everything
        optim=OptimConfig(lr=3e-4, warmup_steps=10),
        router=RouterConfig(regularizer_weight=1e-3, regularizer_schedule="linear", leakage_probability=0.1),
        logging=LoggingConfig(every=10, progress_bar=False),
        checkpoint=CheckpointConfig(every=0, save_final=True),
    )
    result = train(model, tokenizer, config, data=batches)   # -> TrainResult
    result.history[-1]["lm_loss"], result.history[-1]["sparsity"], result.checkpoint

Sections may also be given as dicts (`checkpoint={"save_final": False}`); all fields are validated.

- `model`: an in-memory `L2AForCausalLM` or any HF causal LM (e.g. `Qwen3ForCausalLM` for full-attention
  pretraining: no router fields, so the regulariser is 0 and no leakage is drawn). Trained in place.
- `data`: an iterable of micro-batches, dicts with `input_ids` (B, N) [or (N,)], optional `labels`
  (default `input_ids`; -100 ignored; the model shifts them), `position_ids`, `cu_seqlens` (packed row,
  B = 1, L2A models only), `attention_mask`. Training stops early when it runs out
  (`TrainResult.data_exhausted`). None: built from `config.data` (corpus + packing via `l2a.data`).
  Under torchrun it is this rank's stream; every rank must supply the same number of micro-batches.
- `train(..., on_log=fn)` calls `fn(record)` at each log step; records (also in `output_dir/log.jsonl`)
  hold `step, loss, lm_loss, router_regularizer, lambda, sparsity, sparsity_per_layer, global_layers,
  lr, grad_norm, tokens_per_s, mfu (GPU), leakage_steps`.
- `run_training(config)` loads `config.model` (a directory from `l2a convert`) and its tokenizer;
  `l2a train CONFIG --set key=value` is its command line; `load_config(path, overrides)` reads YAML/TOML.
- `set_trainable(model, groups_or_globs)` freezes everything else; groups: `TRAINABLE_GROUPS`.
- HF Trainer users: `l2a.training.hf.L2ATrainer` (its own module, not imported here; docs/training.md).

Config reference and multi-GPU commands: docs/training.md.
"""

from l2a.training.config import (
    TRAINABLE_GROUPS,
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    OptimConfig,
    RouterConfig,
    TrainConfig,
    load_config,
)
from l2a.training.loop import TrainResult, apply_context_extension, run_training, train
from l2a.training.params import classify_parameter, parameter_groups, set_trainable
from l2a.training.schedules import leakage_draw, lr_factor, regularizer_weight

__all__ = [
    "TRAINABLE_GROUPS",
    "CheckpointConfig",
    "DataConfig",
    "LoggingConfig",
    "OptimConfig",
    "RouterConfig",
    "TrainConfig",
    "TrainResult",
    "apply_context_extension",
    "classify_parameter",
    "leakage_draw",
    "load_config",
    "lr_factor",
    "parameter_groups",
    "regularizer_weight",
    "run_training",
    "set_trainable",
    "train",
]
