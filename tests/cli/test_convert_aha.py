"""`l2a convert --method aha`: an AHA checkpoint that loads through the Auto classes and is the base model
while every head routes."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from l2a.cli import main


@pytest.fixture
def base_dir(tmp_path):
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    path = tmp_path / "base"
    Qwen3ForCausalLM(config).save_pretrained(path)
    return path


def test_cli_writes_an_aha_checkpoint(base_dir, tmp_path, capsys):
    out_dir = tmp_path / "aha"
    assert main(["convert", str(base_dir), str(out_dir), "--window", "4", "--method", "aha"]) == 0
    assert "saved AHA model" in capsys.readouterr().out
    saved = json.loads((out_dir / "config.json").read_text())
    assert saved["model_type"] == "l2a" and saved["method"] == "aha" and saved["router_penalty"] == "l1"
    assert saved["routed_heads"] == [[0, 1, 2, 3]] * 2
    model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-5, rtol=0)


def test_cli_rejects_an_unknown_method(base_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(base_dir), str(tmp_path / "x"), "--window", "4", "--method", "moe"])
    assert exc.value.code == 2 and "invalid choice: 'moe'" in capsys.readouterr().err
