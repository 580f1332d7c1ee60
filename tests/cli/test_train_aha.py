"""`l2a train configs/tiny-cpu.yaml` on a tiny AHA checkpoint: packed documents, per-head sparsity logged,
the checkpoint reloads as an AHA model with trained routers and frozen MLPs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from l2a.cli import main
from l2a.data import load_tokenizer
from l2a.models import L2AForCausalLM, convert_checkpoint

REPO = Path(__file__).resolve().parents[2]


def test_train_cli_on_an_aha_model(tmp_path):
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
    )  # fmt: skip
    Qwen3ForCausalLM(config).save_pretrained(tmp_path / "base")
    load_tokenizer("byte").save_pretrained(tmp_path / "base")
    model_dir = convert_checkpoint(tmp_path / "base", tmp_path / "aha", window=8, method="aha")
    out = tmp_path / "run"
    args = ["train", str(REPO / "configs" / "tiny-cpu.yaml"), "--set", f"model={model_dir}", "--set",
            f"output_dir={out}", "--set", "data.seq_len=64", "--set", "logging.every=1", "--set",
            "logging.progress_bar=false", "--set", "device=cpu", "--set", "steps=2",
            "--set", "router.leakage_probability=0.5"]  # fmt: skip
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(len(r["sparsity_per_head"]) == 2 and len(r["sparsity_per_head"][0]) == 4 for r in records)
    trained = L2AForCausalLM.from_pretrained(out / "checkpoints" / "step-000002")
    converted = L2AForCausalLM.from_pretrained(model_dir)
    assert trained.config.method == "aha"
    assert not torch.equal(trained.model.layers[0].router.weight, converted.model.layers[0].router.weight)
    assert torch.equal(
        trained.model.layers[0].mlp.up_proj.weight, converted.model.layers[0].mlp.up_proj.weight
    )
