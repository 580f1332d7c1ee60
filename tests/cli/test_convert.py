"""`l2a convert`: same model as `convert_model`, tokenizer/generation files copied, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import l2a
from l2a.cli import main


@pytest.fixture
def base_dir(tmp_path):
    """A tiny Qwen3 checkpoint on disk with a (fake) tokenizer file and a generation config."""
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
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(max_new_tokens=7, eos_token_id=3)
    path = tmp_path / "base"
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    return path


def test_cli_produces_the_same_model_as_the_function(base_dir, tmp_path, capsys):
    out_dir = tmp_path / "l2a"
    rc = main(
        [
            "convert",
            str(base_dir),
            str(out_dir),
            "--window",
            "8",
            "--rope-theta",
            "5e6",
            "--max-position-embeddings",
            "1024",
        ]
    )
    assert rc == 0 and "saved L2A model" in capsys.readouterr().out
    expected = l2a.convert_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        sliding_window=8,
        rope_theta=5e6,
        max_position_embeddings=1024,
    )
    saved = load_file(out_dir / "model.safetensors")
    reference = expected.state_dict()
    assert saved.keys() == reference.keys()
    for key, tensor in saved.items():
        assert torch.equal(tensor, reference[key]), key
    loaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert loaded.config.sliding_window == 8 and loaded.config.rope_parameters["rope_theta"] == 5e6
    assert loaded.config.max_position_embeddings == 1024
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected(ids).logits, atol=0, rtol=0)
    assert (out_dir / "tokenizer.json").read_text() == (base_dir / "tokenizer.json").read_text()
    assert GenerationConfig.from_pretrained(out_dir).max_new_tokens == 7


def test_dtype_option(base_dir, tmp_path):
    assert (
        main(["convert", str(base_dir), str(tmp_path / "bf16"), "--window", "4", "--dtype", "bfloat16"]) == 0
    )
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "bf16" / "model.safetensors").values())


def test_refuses_non_empty_output_unless_forced(base_dir, tmp_path, capsys):
    out_dir = tmp_path / "busy"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("x")
    assert main(["convert", str(base_dir), str(out_dir), "--window", "4"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert not (out_dir / "model.safetensors").exists()
    assert main(["convert", str(base_dir), str(out_dir), "--window", "4", "--force"]) == 0
    assert (out_dir / "model.safetensors").is_file() and (out_dir / "keep.txt").is_file()


def test_never_overwrites_the_input(base_dir, capsys):
    before = (base_dir / "model.safetensors").read_bytes()
    assert main(["convert", str(base_dir), str(base_dir), "--window", "4", "--force"]) == 2
    assert "is the input checkpoint" in capsys.readouterr().err
    assert (base_dir / "model.safetensors").read_bytes() == before


def test_missing_checkpoint_files(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out"), "--window", "4"]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["convert", str(empty), str(tmp_path / "out"), "--window", "4"]) == 2
    assert "no config.json" in capsys.readouterr().err
    (empty / "config.json").write_text(Qwen3Config(num_hidden_layers=1).to_json_string())
    assert main(["convert", str(empty), str(tmp_path / "out"), "--window", "4"]) == 2
    assert "no weight files" in capsys.readouterr().err


def test_unsupported_architecture(tmp_path, capsys):
    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(path)
    assert main(["convert", str(path), str(tmp_path / "out"), "--window", "4"]) == 2
    assert "unsupported base architecture 'gpt2'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("window", ["0", "-5"])
def test_nonpositive_window(base_dir, tmp_path, window, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(base_dir), str(tmp_path / "out"), "--window", window])
    assert exc.value.code == 2
    assert "must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("theta", ["0", "-5", "nan", "inf", "fast"])
def test_nonpositive_rope_theta(base_dir, tmp_path, theta, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(base_dir), str(tmp_path / "out"), "--window", "4", "--rope-theta", theta])
    assert exc.value.code == 2
    assert "argument --rope-theta: must be a positive number" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_window_beyond_max_positions_warns_in_one_line(base_dir, tmp_path, capsys):
    assert main(["convert", str(base_dir), str(tmp_path / "out"), "--window", "300"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        "l2a convert: warning: sliding_window=300 exceeds max_position_embeddings=256: the local window "
        "alone covers every position, so no token needs global attention"
    ]


def test_router_logit_offset_is_saved_and_starts_routers_on_the_global_side(base_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["convert", str(base_dir), str(out), "--window", "4", "--router-logit-offset", "0.3"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.router_logit_offset == 0.3
    routers = [layer.router for layer in model.model.layers]
    assert [r.offset for r in routers] == [0.3, 0.3]
    output = model(torch.randint(0, 300, (1, 12)))
    assert torch.equal(output.router_fraction, torch.ones(2))
    # squared penalty: 12 tokens x sigmoid(0.3 / 0.1)^2 = 12 x 0.952574^2 (zero offset: 12 x 0.25 = 3)
    torch.testing.assert_close(output.router_regularizer, torch.tensor(12 * 0.952574**2), rtol=1e-5, atol=0)


@pytest.mark.parametrize("offset", ["nan", "inf", "high"])
def test_router_logit_offset_must_be_finite(base_dir, tmp_path, offset, capsys):
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "convert",
                str(base_dir),
                str(tmp_path / "out"),
                "--window",
                "4",
                "--router-logit-offset",
                offset,
            ]
        )
    assert exc.value.code == 2
    assert "argument --router-logit-offset: must be a" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
