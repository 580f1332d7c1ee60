"""`L2ATrainer`: the HF `transformers.Trainer` with the router regulariser and leakage steps.

`L2ALossMixin` brings the same to other Trainer subclasses (e.g. TRL's): `class T(L2ALossMixin, SFTTrainer)`.

For users of the HF Trainer, accelerate or DeepSpeed (through the Trainer's own integrations)::

    from l2a.training import RouterConfig
    from l2a.training.hf import L2ATrainer

    trainer = L2ATrainer(
        model=l2a_model,
        args=TrainingArguments(output_dir="runs/hf", max_steps=1000, learning_rate=5e-5, ...),
        train_dataset=dataset,  # rows with input_ids, labels (and optionally position_ids, cu_seqlens)
        router=RouterConfig(regularizer_weight=1e-8, regularizer_ramp_steps=500, leakage_probability=0.1),
    )  # trains attention, norms and routers (as `l2a train`); trainable=["*"] trains everything
    trainer.train()

`compute_loss` adds `λ(global_step) · router_regularizer` to the model's LM loss and passes
`global_leakage` drawn from (args.seed, global_step), so every process draws the same. The LM loss is the
model's per-micro-batch mean (the Trainer divides it by the accumulation steps, as for any model without
loss kwargs). Logs gain `lm_loss`, `router_regularizer`, `router_lambda`, `sparsity` and
`sparsity_layer_{i}` (averaged since the last log, over processes).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
from transformers import Trainer

from l2a.training.config import RouterConfig, TrainConfig
from l2a.training.params import set_trainable
from l2a.training.schedules import leakage_draw, regularizer_weight


def _default_trainable() -> list[str]:
    """`TrainConfig.trainable`'s default: what `l2a train` trains unless told otherwise."""
    return next(f for f in dataclasses.fields(TrainConfig) if f.name == "trainable").default_factory()


class L2ALossMixin:
    """The L2A objective for any `transformers.Trainer` subclass: `class MyTrainer(L2ALossMixin, SFTTrainer)`.

    Args (besides the Trainer's):
        router: λ schedule and leakage probability (`RouterConfig`; default: its defaults).
        trainable: groups / glob patterns passed to `set_trainable` before the optimizer is built; None
            (default) selects `l2a train`'s default groups (`TrainConfig.trainable`: attention, norms and
            router; MLPs and embeddings frozen). ``["*"]`` trains every parameter.
    """

    def __init__(
        self, *args: Any, router: RouterConfig | None = None, trainable: list[str] | None = None, **kwargs
    ):
        self.router_config = router if router is not None else RouterConfig()
        model = kwargs.get("model", args[0] if args else None)
        if model is None:
            raise ValueError(f"{type(self).__name__} needs a model")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(f"{type(self).__name__} computes the loss itself; do not pass compute_loss_func")
        is_l2a = getattr(getattr(model, "config", None), "model_type", None) == "l2a"
        if not is_l2a and "global_leakage" not in inspect.signature(model.forward).parameters:
            raise TypeError(
                f"{type(model).__name__} has no router (no `global_leakage` argument); use Trainer"
            )
        set_trainable(model, trainable if trainable is not None else _default_trainable())
        super().__init__(*args, **kwargs)
        # The regulariser is a per-micro-batch mean: let the Trainer average micro-batches itself.
        self.model_accepts_loss_kwargs = False
        self._router_sums: dict[str, torch.Tensor] = {}
        self._router_count = 0

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """LM loss + λ(step) · router regulariser, with this step's leakage draw.

        `num_items_in_batch` is part of the Trainer's signature; it stays None here because the mixin
        sets `model_accepts_loss_kwargs = False` (per-micro-batch mean losses).
        """
        if "labels" not in inputs:
            raise ValueError(
                f"{type(self).__name__} needs `labels` in the batches "
                "(use DataCollatorForLanguageModeling or copy input_ids)"
            )
        step = self.state.global_step
        total = self.state.max_steps if self.state.max_steps > 0 else step + 1
        lam = regularizer_weight(step, self.router_config, total)
        leak = model.training and leakage_draw(self.args.seed, step, self.router_config.leakage_probability)
        outputs = model(**inputs, global_leakage=leak)
        loss = outputs.lm_loss + lam * outputs.router_regularizer
        if model.training:
            self._accumulate(outputs.lm_loss, outputs.router_regularizer, outputs.router_fraction, lam)
        return (loss, outputs) if return_outputs else loss

    def _accumulate(self, lm: torch.Tensor, reg: torch.Tensor, fraction: torch.Tensor, lam: float) -> None:
        values = {
            "lm_loss": lm.detach().float(),
            "router_regularizer": reg.detach().float(),
            "fraction": fraction.float(),
        }
        for key, value in values.items():
            self._router_sums[key] = self._router_sums[key] + value if key in self._router_sums else value
        self._router_count += 1
        self._router_lambda = lam

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._router_count:
            means = {
                k: self.accelerator.reduce(v / self._router_count, reduction="mean")
                for k, v in self._router_sums.items()
            }
            logs["lm_loss"] = means["lm_loss"].item()
            logs["router_regularizer"] = means["router_regularizer"].item()
            logs["router_lambda"] = self._router_lambda
            sparsity = (1.0 - means["fraction"]).tolist()
            if sparsity:
                logs["sparsity"] = sum(sparsity) / len(sparsity)
                for layer, value in zip(
                    self.accelerator.unwrap_model(self.model).config.global_layers, sparsity
                ):
                    logs[f"sparsity_layer_{layer}"] = value
            self._router_sums, self._router_count = {}, 0
        super().log(logs, *args, **kwargs)


class L2ATrainer(L2ALossMixin, Trainer):
    """`transformers.Trainer` with the L2A objective (see `L2ALossMixin` for the extra arguments)."""
