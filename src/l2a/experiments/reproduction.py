"""The small-scale reproduction of the paper's main result (issue 13), as resumable stages.

``run_reproduction(config, out_dir)`` runs, in order (each stage is skipped when its record
``OUT/stages/<stage>.json`` exists, so a run can be split over several processes or machines):

1. ``pretrain``: a Qwen3 model over the byte tokenizer, pretrained densely at L on the embedded corpus
   mixed with the task mix, until its teacher-forced score at L reaches the target or the step bound;
   saved to ``OUT/base`` in bf16 (with its dense scores and perplexity at L).
2. one stage per arm (``clp``, ``l2a``, ``swa``, ``random``): the base extended to factor · L with the same
   rows and steps for every arm, then evaluated at every length (tasks, perplexity by position, routing);
   the L2A stage also prunes its sparsest layers and measures the KV cache. Each writes
   ``OUT/<arm>/result.json`` (small) and, with ``save_models``, the trained model.
3. ``report``: ``OUT/results.json``, ``OUT/report.md``, PNG plots and the targets' pass/fail
   (`l2a.experiments.reproduction_report`).

The data side (task samples, corpus, training rows) is in `l2a.experiments.reproduction_data`; the base
model, scoring and an arm's evaluation in `l2a.experiments.reproduction_models`.

Arms: CLP = the dense model continued (RoPE θ raised); L2A = converted, learned routing with the λ ramp,
leakage steps and optional router-only warm-up; SWA = converted with ``force_route="none"``; random =
converted with ``force_route="random"`` at the L2A arm's measured routed fraction.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from l2a.data import byte_tokenizer
from l2a.data.tasks import TaskSample
from l2a.evaluation.perplexity import perplexity_by_position
from l2a.evaluation.routing import routing_analysis
from l2a.experiments.config import ReproductionConfig
from l2a.experiments.reproduction_data import (
    Corpus,
    TrainingRows,
    _draw_one,
    _training_pool,
    eval_samples,
    load_corpus,
)
from l2a.experiments.reproduction_models import (
    _autocast,
    _kv_bytes,
    _load_base,
    _save_bf16,
    build_base_model,
    evaluate_arm,
    score_tasks,
)
from l2a.experiments.stages import ARMS, STAGES


# --------------------------------------------------------------------------------------------- run dir
class RunDirectory:
    """The run directory: ``config.yaml`` (the experiment's keys, checked on every run) and stage records.

    A stage is done when ``stages/<stage>.json`` exists; the record is written last, atomically, so an
    interrupted stage is redone (its training resumes from its own checkpoints when it has any).
    """

    def __init__(self, root: str | Path, config: ReproductionConfig):
        self.root = Path(root)
        self.config = config
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "stages").mkdir(exist_ok=True)
        saved = self.root / "config.yaml"
        if saved.exists():
            previous = yaml.safe_load(saved.read_text()) or {}
            if previous.get("fingerprint") != config.fingerprint():
                raise ValueError(
                    f"{self.root} holds a run of a different experiment config (fingerprint "
                    f"{previous.get('fingerprint')} vs {config.fingerprint()}); use another --out"
                )
        else:
            body = {"fingerprint": config.fingerprint(), "config": config.to_dict()}
            saved.write_text(yaml.safe_dump(body, sort_keys=False))

    def record_path(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.json"

    def done(self, stage: str) -> bool:
        return self.record_path(stage).exists()

    def record(self, stage: str) -> dict[str, Any]:
        path = self.record_path(stage)
        if not path.exists():
            raise FileNotFoundError(f"stage {stage!r} has not run yet in {self.root} (no {path})")
        return json.loads(path.read_text())

    def finish(self, stage: str, result: dict[str, Any], seconds: float) -> dict[str, Any]:
        from l2a.experiments.reproduction_report import environment

        record = {
            "stage": stage,
            "fingerprint": self.config.fingerprint(),
            "seconds": seconds,
            "environment": environment(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "result": result,
        }
        tmp = self.record_path(stage).with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.rename(self.record_path(stage))
        return record


# --------------------------------------------------------------------------------------------- stages
class Reproduction:
    """The stages of one run (see the module docstring); `run(stages)` runs those not done yet."""

    def __init__(self, config: ReproductionConfig, out_dir: str | Path):
        from l2a.evaluation.runner import resolve_device

        self.config = config
        self.dir = RunDirectory(out_dir, config)
        self.device = resolve_device(config.device)
        self.tokenizer = byte_tokenizer()
        self._corpus: Corpus | None = None

    def log(self, message: str) -> None:
        """A plain progress line (always; `config.progress` switches the tqdm bars of training only)."""
        print(f"[reproduce {time.strftime('%H:%M:%S')}] {message}", flush=True)

    @property
    def corpus(self) -> Corpus:
        if self._corpus is None:
            self._corpus = load_corpus(self.config, self.tokenizer)
        return self._corpus

    def _train_config(self, stage: str, **fields: Any) -> Any:
        from l2a.training import TrainConfig

        every = fields.pop("checkpoint_every")
        return TrainConfig(
            output_dir=str(self.dir.root / stage / "train"),
            seed=self.config.seed,
            device=str(self.device),
            precision="auto",
            # the model's own loss: full logits over 259 byte tokens are small, and the pretraining check
            # calls the model from `on_log`, inside the loop (a fused loss swaps a plain model's forward)
            loss_impl="plain",
            logging={
                "every": fields.pop("log_every", 10),
                "progress_bar": self.config.progress,
                "jsonl": True,
            },
            checkpoint={"every": every, "resume": "auto", "save_final": False, "keep_last": 1},
            **fields,
        )

    def run(self, stages: Sequence[str] | None = None) -> dict[str, Any]:
        """Run the given stages (default: all) in `STAGES` order, skipping those already done."""
        wanted = list(STAGES) if stages is None else list(stages)
        unknown = [s for s in wanted if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
        skipped = [s for s in wanted if s in ARMS and s not in self.config.extend.arms]
        if skipped and stages is not None:
            raise ValueError(f"stage(s) {skipped} are not among extend.arms {self.config.extend.arms}")
        self.preflight()
        ran = {}
        threads = torch.get_num_threads()
        if self.config.threads is not None and self.device.type == "cpu":
            torch.set_num_threads(self.config.threads)
        try:
            for stage in STAGES:
                if stage not in wanted or (stage in ARMS and stage not in self.config.extend.arms):
                    continue
                if self.dir.done(stage) and stage != "report":
                    self.log(f"stage {stage}: done already ({self.dir.record_path(stage)}), skipped")
                    continue
                start = time.perf_counter()
                self.log(f"stage {stage}: start")
                result = self.run_stage(stage)
                ran[stage] = self.dir.finish(stage, result, time.perf_counter() - start)
                self.log(f"stage {stage}: done in {time.perf_counter() - start:.0f} s")
        finally:
            torch.set_num_threads(threads)
        return ran

    def preflight(self) -> None:
        """Draw one sample of every task at every length the run uses, so that a task that does not fit a
        length fails in seconds (ValueError naming the task), before any training."""
        cfg = self.config
        lengths = {cfg.data.seq_len, cfg.long_length, int(cfg.extend.task_min_factor * cfg.data.seq_len)}
        names = dict.fromkeys([*cfg.data.tasks, *cfg.eval_tasks])
        for name in names:
            for length in sorted({*lengths, *cfg.eval_lengths}):
                try:
                    _draw_one((name, cfg.data.task_args.get(name, {}), length - cfg.data.answer_reserve, 0))
                except (ValueError, RuntimeError) as error:
                    raise ValueError(
                        f"task {name!r} cannot make a sample at length {length}: {error}"
                    ) from None

    def run_stage(self, stage: str) -> dict[str, Any]:
        if stage == "pretrain":
            return self.pretrain()
        if stage == "report":
            from l2a.experiments.reproduction_report import write_reproduction_report

            return write_reproduction_report(self.dir.root, self.config, self.dir)
        return self.extend(stage)

    def pretrain(self) -> dict[str, Any]:
        from l2a.training import train

        cfg, tok = self.config, self.tokenizer
        torch.manual_seed(cfg.seed)
        length = cfg.data.seq_len
        reserve = cfg.data.answer_reserve
        pool = _training_pool(cfg, "pretrain", length - reserve, length - reserve)
        check = eval_samples(cfg, length, cfg.pretrain.check_samples, "check")
        rows = TrainingRows(
            pool,
            self.corpus.train_ids,
            seq_len=length,
            batch_size=cfg.pretrain.batch_size,
            task_ratio=cfg.data.task_ratio,
            text_loss_tokens=cfg.data.text_loss_tokens,
            pad_token_id=tok.pad_token_id,
            seed=f"{cfg.seed}/pretrain",
            task_loss=cfg.pretrain.task_loss,
        )
        if cfg.pretrain.init_from is None:
            model = build_base_model(cfg, tok)
        else:
            model = _load_base(Path(cfg.pretrain.init_from), self.device)
            fresh = build_base_model(cfg, tok).config
            for name in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "intermediate_size",
                "vocab_size",
            ):
                if getattr(model.config, name) != getattr(fresh, name):
                    raise ValueError(
                        f"pretrain.init_from={cfg.pretrain.init_from}: its {name} "
                        f"{getattr(model.config, name)} differs from the config's {getattr(fresh, name)}"
                    )
        checks: list[dict[str, Any]] = []
        stopped_by = ["max_steps"]
        started = time.perf_counter()

        def on_log(record: dict[str, Any]) -> None:
            step = record["step"]
            limit = cfg.pretrain.max_seconds
            out_of_time = limit is not None and time.perf_counter() - started >= limit
            if out_of_time:
                stopped_by[0] = "max_seconds"
                rows.stop()
            if step % cfg.pretrain.check_every and step != cfg.pretrain.max_steps and not out_of_time:
                return
            scores = score_tasks(model, tok, check, cfg)
            mean = sum(r["score"] for r in scores.values()) / len(scores)
            checks.append({"step": step, "score": mean, "lm_loss": record["lm_loss"]})
            self.log(
                f"[pretrain] step {step}: dense score at L {mean:.1f} (target {cfg.pretrain.target_score})"
            )
            if mean >= cfg.pretrain.target_score:
                stopped_by[0] = "target_score"
                rows.stop()
            elif out_of_time:
                self.log(f"[pretrain] step {step}: pretrain.max_seconds={limit} reached, stopping")

        p = cfg.pretrain
        result = train(
            model,
            tok,
            self._train_config(
                "pretrain",
                steps=p.max_steps,
                trainable=["*"],
                optim={"lr": p.lr, "warmup_steps": p.warmup_steps},
                router={"regularizer_weight": 0.0, "leakage_probability": 0.0},
                checkpoint_every=p.checkpoint_every,
                log_every=math.gcd(p.check_every, 10),
            ),
            data=rows,
            on_log=on_log,
        )
        train_seconds = time.perf_counter() - started
        model.eval()
        _save_bf16(model, tok, self.dir.root / "base")
        shutil.rmtree(self.dir.root / "pretrain" / "train" / "checkpoints", ignore_errors=True)
        with _autocast(self.device):
            ppl = perplexity_by_position(
                model, tok, self.corpus.heldout_texts, length, max_sequences=cfg.eval.perplexity_windows
            )
        samples = eval_samples(cfg, length, cfg.eval.samples, "eval")
        base_rows = [
            {
                "arm": "base",
                "length": length,
                "task": task,
                "score": r["score"],
                "sparsity": 0.0,
                "beyond_window_score": r["beyond_window_score"],
                "samples": r["samples"],
            }
            for task, r in score_tasks(model, tok, samples, cfg).items()
        ]
        return {
            "steps": result.step,
            "stopped_early": result.data_exhausted,
            "stopped_by": stopped_by[0],
            "train_seconds": train_seconds,
            "seconds_per_step": train_seconds / max(1, result.step),
            "checks": checks,
            "parameters": sum(p.numel() for p in model.parameters()),
            "rows": base_rows,
            "perplexity": {"arm": "base", **ppl.to_dict()},
            "last_log": result.history[-1] if result.history else None,
        }

    def _arm_model(self, arm: str) -> torch.nn.Module:
        from l2a.models import convert_model

        base = _load_base(self.dir.root, self.device)
        if arm == "clp":
            return base
        e = self.config.extend
        model = convert_model(base, sliding_window=e.window, router_logit_offset=e.router_logit_offset)
        if arm == "swa":
            model.config.force_route = "none"
        elif arm == "random":
            routed = self.dir.record("l2a")["result"]["routed_fraction_long"]
            model.config.random_route_fraction = float(sum(routed) / len(routed))
            model.config.force_route = "random"
        return model

    def extend(self, arm: str) -> dict[str, Any]:
        from l2a.training import train

        cfg, tok, e = self.config, self.tokenizer, self.config.extend
        if not self.dir.done("pretrain"):
            raise FileNotFoundError(
                f"stage {arm!r} needs the pretrain stage: run it first (--stage pretrain)"
            )
        if arm == "random" and not self.dir.done("l2a"):
            raise FileNotFoundError(
                "stage 'random' needs the l2a stage (its measured sparsity): run it first"
            )
        long = cfg.long_length
        reserve = cfg.data.answer_reserve
        pool = _training_pool(
            cfg, "extend", int(e.task_min_factor * cfg.data.seq_len) - reserve, long - reserve
        )
        rows = TrainingRows(
            pool,
            self.corpus.train_ids,
            seq_len=long,
            batch_size=e.batch_size,
            task_ratio=cfg.data.task_ratio,
            text_loss_tokens=e.text_loss_tokens,
            pad_token_id=tok.pad_token_id,
            seed=f"{cfg.seed}/extend",
        )
        torch.manual_seed(cfg.seed)
        model = self._arm_model(arm)
        learned = arm == "l2a"
        started = time.perf_counter()
        result = train(
            model,
            tok,
            self._train_config(
                arm,
                steps=e.steps,
                trainable=[*e.trainable, *(["router"] if learned else [])],
                rope_theta=e.rope_theta,
                max_position_embeddings=max(cfg.eval_lengths),
                optim={
                    "lr": e.lr,
                    "warmup_steps": e.warmup_steps,
                    "router_lr_scale": e.router_lr_scale if learned else 1.0,
                },
                router={
                    "regularizer_weight": e.regularizer_weight if learned else 0.0,
                    "regularizer_schedule": "linear",
                    "regularizer_ramp_steps": max(1, int(e.ramp_fraction * e.steps)),
                    "leakage_probability": e.leakage_probability if learned else 0.0,
                    "router_only_steps": e.router_only_steps if learned else 0,
                },
                checkpoint_every=e.checkpoint_every,
            ),
            data=rows,
        )
        train_seconds = time.perf_counter() - started
        shutil.rmtree(self.dir.root / arm / "train" / "checkpoints", ignore_errors=True)
        model.eval()
        torch.manual_seed(cfg.seed + 1)  # the random arm's evaluation draws
        out = evaluate_arm(arm, model, tok, cfg, self.corpus, self.log)
        out["steps"] = result.step
        out["train_seconds"] = train_seconds
        out["last_log"] = result.history[-1] if result.history else None
        out["collapse_steps"] = [r["step"] for r in result.history if "routing_collapse" in r]
        long_rows = [r for r in out["rows"] if r["length"] == long and r["routed_fraction"] is not None]
        if long_rows:
            out["routed_fraction_long"] = (
                torch.tensor([r["routed_fraction"] for r in long_rows]).mean(0).tolist()
            )
        probe = eval_samples(cfg, long, 1, "kv")[cfg.eval_tasks[0]][0]
        out["kv_bytes"] = _kv_bytes(model, probe)
        if arm in ("l2a", "random") and cfg.eval.routing_samples:
            samples = eval_samples(cfg, long, cfg.eval.routing_samples, "routing")
            report = routing_analysis(model, tok, [s for batch in samples.values() for s in batch])
            out["routing"] = report.to_dict()
        if learned:
            out["pruning"] = self.prune(model, out, probe)
        if cfg.save_models:
            _save_bf16(model, tok, self.dir.root / arm / "model")
        (self.dir.root / arm).mkdir(parents=True, exist_ok=True)
        (self.dir.root / arm / "result.json").write_text(json.dumps(out, indent=1) + "\n")
        return out

    def prune(
        self, model: torch.nn.Module, evaluated: dict[str, Any], probe: TaskSample
    ) -> list[dict[str, Any]]:
        """Prune the sparsest global layers (per `prune.fractions`) of a copy of the L2A model and evaluate
        it at every length; rows ``{"arm": "l2a_pruned", "pruned_layers", "kv_bytes", ...}``."""
        from l2a.models.pruning import prune_global_layers

        cfg = self.config
        layers = list(model.config.global_layers)
        routed = evaluated["routed_fraction_long"]
        order = [layer for _, layer in sorted(zip(routed, layers))]
        results = []
        for fraction in cfg.prune.fractions:
            count = max(1, round(fraction * len(layers)))
            pruned_model = copy.deepcopy(model)
            pruned = prune_global_layers(pruned_model, order[:count])
            evaluation = evaluate_arm(
                f"l2a_pruned_{count}", pruned_model, self.tokenizer, cfg, self.corpus, self.log
            )
            for row in evaluation["rows"]:
                # pruned layers skip global attention for every token: they count with sparsity 1
                kept = row["routed_fraction"] or []
                row["sparsity"] = (sum(1.0 - f for f in kept) + len(pruned)) / len(layers)
                row["arm"] = "l2a_pruned"
                row["pruned_layers"] = pruned
                row["prune_fraction"] = fraction
            evaluation["perplexity"] |= {"arm": "l2a_pruned", "pruned_layers": pruned}
            results.append(
                {
                    "arm": "l2a_pruned",
                    "pruned_layers": pruned,
                    "prune_fraction": fraction,
                    "kv_bytes": _kv_bytes(pruned_model, probe),
                    "kv_bytes_unpruned": evaluated["kv_bytes"],
                    "kv_length": len(probe.input_ids),
                    "rows": evaluation["rows"],
                    "perplexity": evaluation["perplexity"],
                }
            )
            del pruned_model
        return results


def run_reproduction(
    config: ReproductionConfig, out_dir: str | Path, stages: Sequence[str] | None = None
) -> dict[str, Any]:
    """Run the experiment's stages not yet done in ``out_dir`` (all by default); returns the records of the
    stages that ran now."""
    return Reproduction(config, out_dir).run(stages)
