"""Timing probe for `l2a reproduce` (issue 13): seconds per training step and per evaluation batch of a
reproduction config's models on this device, measured, so that a device call can size its stages.

Random tokens (timing only, nothing is learned): the base model of the config trained densely at
(pretrain.batch_size, L); the same model continued densely (CLP) and converted to L2A at
(extend.batch_size, factor · L) — a fresh L2A model routes every token (zero-initialised routers), the
slowest case, as leakage steps are; and one teacher-forced evaluation batch (eval.batch_size, largest
evaluation length) of each. Through the library trainer (`l2a.training.train`, bf16 autocast on CUDA).

    python benchmarks/reproduction_probe.py configs/reproduction-h200.yaml --steps 12 --out probe.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterator

import torch

from l2a.data import byte_tokenizer
from l2a.experiments.config import load_reproduction_config
from l2a.experiments.reproduction_models import _autocast, build_base_model
from l2a.models import convert_model
from l2a.training import TrainConfig, train


def _random_rows(batch: int, length: int, vocab: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(3, vocab, (batch, length), generator=generator)
        yield {"input_ids": ids, "labels": ids.clone()}


def seconds_per_step(
    model: torch.nn.Module, tokenizer, batch: int, length: int, steps: int, trainable: list[str], **router
) -> float:
    """Median seconds per optimizer step over the log intervals after the first (warm-up, compilation)."""
    every = max(1, steps // 3)
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            output_dir=tmp,
            device=str(next(model.parameters()).device),
            steps=steps,
            trainable=trainable,
            loss_impl="plain",
            logging={"every": every, "progress_bar": False, "jsonl": False},
            checkpoint={"every": 0, "save_final": False},
            router={"regularizer_weight": 0.0, "leakage_probability": 0.0, **router},
        )
        result = train(model, tokenizer, config, data=_random_rows(batch, length, len(tokenizer), 0))
    rates = sorted(r["tokens_per_s"] for r in result.history[1:]) or [result.history[-1]["tokens_per_s"]]
    return batch * length / rates[len(rates) // 2]


@torch.no_grad()
def seconds_per_eval_batch(
    model: torch.nn.Module, batch: int, length: int, vocab: int, repeats: int = 3
) -> float:
    device = next(model.parameters()).device
    model.eval()
    ids = torch.randint(3, vocab, (batch, length), device=device)
    mask = torch.ones_like(ids)
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with _autocast(device):
            model(input_ids=ids, attention_mask=mask, use_cache=False).logits.argmax(-1).cpu()
        times.append(time.perf_counter() - start)
    model.train()
    return sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default=None, help="write the timings as JSON here")
    args = parser.parse_args()
    cfg = load_reproduction_config(args.config, args.overrides)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device)
    torch.manual_seed(cfg.seed)
    tok = byte_tokenizer()
    vocab, long, longest = len(tok), cfg.long_length, max(cfg.eval_lengths)
    begin = time.perf_counter()
    out: dict[str, float | str] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}

    model = build_base_model(cfg, tok).to(device)
    out["pretrain_s_per_step"] = seconds_per_step(
        model, tok, cfg.pretrain.batch_size, cfg.data.seq_len, args.steps, ["*"]
    )
    model.config.max_position_embeddings = longest
    out["clp_s_per_step"] = seconds_per_step(
        model, tok, cfg.extend.batch_size, long, args.steps, list(cfg.extend.trainable)
    )
    out["dense_eval_s_per_batch"] = seconds_per_eval_batch(model, cfg.eval.batch_size, longest, vocab)
    converted = convert_model(model, sliding_window=cfg.extend.window).to(device)
    out["l2a_s_per_step"] = seconds_per_step(
        converted, tok, cfg.extend.batch_size, long, args.steps, [*cfg.extend.trainable, "router"]
    )
    out["l2a_eval_s_per_batch"] = seconds_per_eval_batch(converted, cfg.eval.batch_size, longest, vocab)
    out["probe_seconds"] = time.perf_counter() - begin
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(out, handle, indent=1)


if __name__ == "__main__":
    main()
