"""`l2a train configs/tiny-cpu.yaml` on a tiny model converted in the test, then resumed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
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


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return _tiny_converted(tmp_path_factory.mktemp("train-cli"))


def _bad_inputs(root: Path) -> list[tuple[list[str], str]]:
    """(extra arguments, expected message) for every mistake `l2a train` must answer in one line."""
    (root / "empty").mkdir(exist_ok=True)
    (root / "bad.yaml").write_text("steps: [1\n")
    (root / "bad.toml").write_text("steps = \n")
    (root / "list.yaml").write_text("- steps\n")
    (root / "noconfig").mkdir(exist_ok=True)
    (root / "notext.jsonl").write_text('{"body": "a document"}\n')
    corrupt = root / "corrupt-step"
    corrupt.mkdir(exist_ok=True)
    for name in ("config.json", "trainer_state.pt", "rank_00000.pt", "model.safetensors"):
        (corrupt / name).write_text("{}" if name == "config.json" else "garbage")
    set_ = lambda *items: [x for item in items for x in ("--set", item)]  # noqa: E731
    return [
        (["CONFIG=" + str(root / "missing.yaml")], "config file '.*missing.yaml' does not exist"),
        (["CONFIG=" + str(root / "bad.yaml")], r"config file '.*bad.yaml' is not valid YAML: .* at line 2"),
        (["CONFIG=" + str(root / "bad.toml")], r"config file '.*bad.toml' is not valid TOML"),
        (["CONFIG=" + str(root / "list.yaml")], "must hold a mapping at the top level"),
        (["CONFIG=" + str(root / "empty")], "must end in .yaml, .yml or .toml"),
        (set_("stepz=3"), "unknown config key 'stepz'; did you mean 'steps'?"),
        (set_("optim.lrr=1e-3"), "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
        (set_("optimm.lr=1e-3"), "unknown config key 'optimm'; did you mean 'optim'?"),
        (set_("steps"), "must look like key.sub=value"),
        (set_("data.sources=[a"), r"override 'data.sources=\[a': the value is not valid YAML"),
        (set_("steps=abc"), "steps must be an integer, got 'abc'"),
        (set_("steps=0"), "steps must be >= 1, got 0"),
        (set_("optim.lr=-1"), "optim.lr must be > 0"),
        (set_("precision=fp8"), "precision must be one of"),
        (set_("model=null"), "the config names no model"),
        (set_(f"model={root / 'nowhere'}"), "model '.*nowhere' does not exist"),
        (set_("model=./nowhere"), "model './nowhere' does not exist"),
        (set_(f"model={root / 'noconfig'}"), "model directory '.*noconfig' has no config.json"),
        (set_(f"data.sources=[{root / 'none'}]"), "data.sources: corpus source '.*none' does not exist"),
        (set_(f"data.sources=[{root / 'empty'}]"), "data.sources: corpus .* holds no text documents"),
        (set_(f"data.sources=[{root / 'notext.jsonl'}]"), "notext.jsonl:1: record has no field 'text'"),
        (
            set_("data.task=kv_retrival", "data.task_ratio=0.5"),
            "unknown data.task 'kv_retrival'; did you mean",
        ),
        (
            set_("data.task=niah_single_1", "data.task_ratio=0.5"),
            r"data.seq_len=64 is too short for data.task",
        ),
        (
            set_("data.task=kv_retrieval", "data.task_ratio=0.5", "data.seq_len=16"),
            "16 tokens of each sequence",
        ),
        (set_("data.seq_len=4096"), "data.seq_len=4096 exceeds the model's .* max_position_embeddings=512"),
        (set_("device=gpu"), "device must be None, 'cpu', 'cuda' or 'cuda:N'"),
        (
            set_(f"checkpoint.resume={corrupt}"),
            "checkpoint file .*corrupt-step/model.safetensors is truncated",
        ),
    ]


BAD_IDS = [
    "missing-config", "malformed-yaml", "malformed-toml", "not-a-mapping", "not-a-config-file", "typo-key",
    "typo-section-key", "typo-section", "no-equals", "bad-yaml-value", "not-an-int", "out-of-range",
    "negative-lr", "bad-choice", "no-model", "missing-model", "missing-relative-model", "no-config-json",
    "missing-corpus", "empty-corpus", "record-without-text", "unknown-task", "length-too-short",
    "length-below-answer-reserve", "seq-len-beyond-max-positions", "bad-device", "corrupt-resume-checkpoint",
]  # fmt: skip


@pytest.mark.parametrize("case", range(len(BAD_IDS)), ids=BAD_IDS)
def test_bad_input_is_one_line_exit_2_and_touches_nothing(converted, tmp_path, capsys, case):
    extra, message = _bad_inputs(tmp_path)[case]
    config = str(REPO / "configs" / "tiny-cpu.yaml")
    if extra[0].startswith("CONFIG="):
        config, extra = extra[0].removeprefix("CONFIG="), extra[1:]
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1}\n')
    args = ["train", config, "--set", f"model={converted}", "--set", f"output_dir={out}", "--set",
            "data.seq_len=64", "--set", "device=cpu", *extra]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("l2a train: error: "), err
    assert re.search(message, err), err
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl"]
    assert (out / "log.jsonl").read_text() == '{"step": 1}\n'


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu(converted, tmp_path, capsys):
    args = ["train", str(REPO / "configs" / "tiny-cpu.yaml"), "--set", f"model={converted}", "--set",
            f"output_dir={tmp_path / 'run'}", "--set", "device=cuda"]  # fmt: skip
    assert main(args) == 2
    assert (
        capsys.readouterr().err == "l2a train: error: device 'cuda': CUDA is not available on this machine\n"
    )
    assert not (tmp_path / "run").exists()


def test_resume_auto_falls_back_past_a_corrupt_checkpoint(converted, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", str(REPO / "configs" / "tiny-cpu.yaml"), "--set", f"model={converted}", "--set",
            f"output_dir={out}", "--set", "data.seq_len=64", "--set", "logging.progress_bar=false", "--set",
            "checkpoint.every=1", "--set", "checkpoint.keep_last=3", "--set", "optim.warmup_steps=0", "--set",
            "device=cpu"]  # fmt: skip
    assert main([*args, "--set", "steps=3"]) == 0
    step3 = out / "checkpoints" / "step-000003"
    # cloned: the loaded tensors may be memory-mapped from the file truncated below
    expected = {k: v.clone() for k, v in L2AForCausalLM.from_pretrained(step3).state_dict().items()}
    weights = step3 / "model.safetensors"
    truncated = weights.read_bytes()[:200]  # as after a full disk
    weights.unlink()
    weights.write_bytes(truncated)
    capsys.readouterr()

    assert main([*args, "--set", "steps=3"]) == 0  # resume: auto in the recipe
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("l2a train: warning:")]
    assert len(warning) == 1 and "step-000003/model.safetensors is truncated" in warning[0]
    assert "moved it aside to step-000003.corrupt and resuming from step-000002" in warning[0]
    assert (out / "checkpoints" / "step-000003.corrupt" / "model.safetensors").stat().st_size == 200
    redone = L2AForCausalLM.from_pretrained(step3).state_dict()
    for name, tensor in expected.items():  # resuming from step 2 reproduces step 3 exactly
        assert torch.equal(redone[name], tensor), name
