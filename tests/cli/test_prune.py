"""`l2a prune`: pruned checkpoint reloads with the chosen layers local-only; clear errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

import l2a
from l2a.cli import main


def _qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )


@pytest.fixture
def l2a_dir(tmp_path):
    path = tmp_path / "l2a"
    l2a.convert_model(_qwen2(), sliding_window=4).save_pretrained(path)
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


def test_prune_copies_tokenizer_and_generation_config(l2a_dir, tmp_path):
    from transformers import GenerationConfig

    (l2a_dir / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (l2a_dir / "tokenizer_config.json").write_text('{"model_max_length": 77}')
    GenerationConfig(max_new_tokens=7, eos_token_id=3).save_pretrained(l2a_dir)
    assert main(["prune", str(l2a_dir), str(tmp_path / "out"), "--layers", "1"]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_text() == (l2a_dir / name).read_text()
    generation = GenerationConfig.from_pretrained(tmp_path / "out")
    assert (generation.max_new_tokens, generation.eos_token_id) == (7, 3)


def test_prune_refuses_a_non_l2a_model_before_loading_it(tmp_path, capsys):
    _qwen2().save_pretrained(tmp_path / "q")
    assert main(["prune", str(tmp_path / "q"), str(tmp_path / "out"), "--layers", "0"]) == 2
    assert capsys.readouterr().err.endswith("holds a 'qwen2' model, not an L2A model\n")
    assert not (tmp_path / "out").exists()
