"""`l2a train configs/tiny-cpu.yaml` on a tiny model converted in the test, then resumed."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from l2a.cli import main
from l2a.data import load_tokenizer
from l2a.models import L2AForCausalLM, convert_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _tiny_converted(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    base = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=259,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=512,
        )
    )
    base.save_pretrained(tmp_path / "base")
    load_tokenizer("byte").save_pretrained(tmp_path / "base")
    return convert_checkpoint(tmp_path / "base", tmp_path / "l2a", window=16)


def test_train_cli_runs_and_resumes(tmp_path, capsys):
    model_dir = _tiny_converted(tmp_path)
    out = tmp_path / "run"
    args = ["train", str(REPO / "configs" / "tiny-cpu.yaml"), "--set", f"model={model_dir}", "--set",
            f"output_dir={out}", "--set", "data.seq_len=64", "--set", "logging.every=1", "--set",
            "logging.progress_bar=false", "--set", "checkpoint.every=2", "--set", "device=cpu"]  # fmt: skip
    assert main([*args, "--set", "steps=3"]) == 0
    assert "checkpoint:" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(0.0 <= r["sparsity"] <= 1.0 and r["lm_loss"] > 0 for r in records)
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step-000002", "step-000003"]

    # the recipe says resume: auto, so a longer run continues from step 3
    assert main([*args, "--set", "steps=4"]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    trained = L2AForCausalLM.from_pretrained(out / "checkpoints" / "step-000004")
    converted = L2AForCausalLM.from_pretrained(model_dir)
    assert not torch.equal(trained.model.layers[0].router.weight, converted.model.layers[0].router.weight)
    assert torch.equal(
        trained.model.layers[0].mlp.up_proj.weight, converted.model.layers[0].mlp.up_proj.weight
    )
