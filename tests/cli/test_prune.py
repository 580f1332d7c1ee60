"""`l2a prune`: pruned checkpoint reloads with the chosen layers local-only; clear errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

import l2a
from l2a.cli import main


@pytest.fixture
def l2a_dir(tmp_path):
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    path = tmp_path / "l2a"
    l2a.convert_model(base, sliding_window=4).save_pretrained(path)
    return path


def test_prune_by_layers(l2a_dir, tmp_path, capsys):
    assert main(["prune", str(l2a_dir), str(tmp_path / "out"), "--layers", "0", "2"]) == 0
    assert "pruned layers [0, 2]" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.global_layers == [1]
    assert [layer.has_global for layer in model.model.layers] == [False, True, False]


def test_prune_by_threshold(l2a_dir, tmp_path):
    args = [
        "prune",
        str(l2a_dir),
        str(tmp_path / "out"),
        "--threshold",
        "0.1",
        "--fractions",
        "0.5",
        "0.05",
        "0.2",
    ]
    assert main(args) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.global_layers == [0, 2]


def test_errors(l2a_dir, tmp_path, capsys):
    assert (
        main(["prune", str(l2a_dir), str(tmp_path / "out"), "--threshold", "0.1", "--fractions", "0.5"]) == 2
    )
    assert "3 global layers" in capsys.readouterr().err
    assert main(["prune", str(tmp_path / "nowhere"), str(tmp_path / "out"), "--layers", "0"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["prune", str(l2a_dir), str(l2a_dir), "--layers", "0", "--force"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
