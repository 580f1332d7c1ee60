"""TrainConfig: validation at construction, YAML/TOML loading, dotted overrides, the shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

from l2a.training import TrainConfig, load_config
from l2a.training.config import DataConfig, OptimConfig, RouterConfig

REPO = Path(__file__).resolve().parents[2]


def test_defaults_follow_the_paper():
    config = TrainConfig()
    assert config.trainable == ["attention", "norms", "router"]
    assert config.router.leakage_probability == 0.1
    assert config.router.regularizer_schedule == "linear"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: TrainConfig(parallel="zero2"), "parallel.data_parallel must be one of"),
        (lambda: TrainConfig(steps=0), "steps must be >= 1"),
        (lambda: TrainConfig(device="gpu"), "device must be"),
        (lambda: OptimConfig(lr=0.0), "optim.lr"),
        (lambda: RouterConfig(leakage_probability=1.5), "leakage_probability"),
        (lambda: DataConfig(micro_batch_size=2), "micro_batch_size must be 1"),
        (lambda: DataConfig(task_ratio=0.5), "needs data.task"),
        (lambda: TrainConfig.from_dict({"optim": {"learning_rate": 1.0}}), r"optim.learning_rate"),
    ],
    ids=["literal", "steps", "device", "lr", "leakage", "packed-batch", "task-ratio", "unknown-key"],
)
def test_invalid_values_are_rejected(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_literal_checked_when_built_from_dict():
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig.from_dict({"precision": "fp16"})


def test_yaml_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 3\noptim:\n  lr: 5e-5\n  betas: [0.9, 0.99]\ndata:\n  sources: [a, b]\n")
    config = load_config(
        path, ["optim.lr=1e-4", "router.regularizer_ramp_steps=7", "data.separate_documents=false"]
    )
    assert config.steps == 3
    assert config.optim.lr == 1e-4 and config.optim.betas == (0.9, 0.99)
    assert config.router.regularizer_ramp_steps == 7
    assert config.data.sources == ["a", "b"] and config.data.separate_documents is False
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('steps = 4\nparallel = "ddp"\n[router]\nregularizer_weight = 1e-8\n')
    config = load_config(path)
    assert (config.steps, config.parallel.data_parallel, config.router.regularizer_weight) == (4, "ddp", 1e-8)


def test_bad_override_names_the_item():
    with pytest.raises(ValueError, match="key.sub=value"):
        load_config(None, ["steps"])


@pytest.mark.parametrize("name", ["tiny-cpu.yaml", "qwen3-8b-128k.yaml", "qwen3-8b-128k-cp.yaml"])
def test_shipped_recipes_load(name):
    config = load_config(REPO / "configs" / name)
    if name.startswith("qwen3"):
        assert config.rope_theta == 5e6 and config.max_position_embeddings == 131072
        assert config.data.seq_len == 131072 and config.optim.lr == 5e-5
        assert config.router.regularizer_weight == 1e-8 and config.router.leakage_probability == 0.1
        assert config.precision == "bf16" and config.gradient_checkpointing
        if name.endswith("-cp.yaml"):
            assert (config.parallel.data_parallel, config.parallel.context_parallel) == ("fsdp", 8)
        else:
            assert (config.parallel.data_parallel, config.frozen_precision) == ("none", "bf16")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stepz=3"], r"unknown config key 'stepz'; did you mean 'steps'\?"),
        (["router.leakage_probabilty=0.5"], r"did you mean 'router.leakage_probability'\?"),
        (["zzz=1"], r"unknown config key 'zzz' \(valid keys: activation_offload, checkpoint, "),
        (["steps=abc"], "steps must be an integer, got 'abc'"),
        (["optim.lr=fast"], "optim.lr must be a number, got 'fast'"),
        (["trainable=attention"], "trainable must be a list, got 'attention'"),
        (["logging.jsonl=maybe"], "logging.jsonl must be true/false, got 'maybe'"),
        (["data.sources=[a"], r"override 'data.sources=\[a': the value is not valid YAML"),
    ],
    ids=["typo", "typo-in-section", "no-close-key", "int", "float", "list", "bool", "yaml-value"],
)
def test_override_mistakes_are_value_errors_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("c.yaml", "steps: [1\n", r"config file '.*c.yaml' is not valid YAML: .* at line 2, column 1"),
        ("c.toml", "steps = \n", r"config file '.*c.toml' is not valid TOML: "),
        ("c.json", "{}", r"config file '.*c.json' must end in .yaml, .yml or .toml"),
        ("c.yaml", None, r"config file '.*c.yaml' does not exist"),
    ],
    ids=["yaml", "toml", "suffix", "missing"],
)
def test_file_mistakes_name_the_file(tmp_path, name, text, message):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_config(tmp_path / name)
