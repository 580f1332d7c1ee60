"""Fixtures: tiny random base models built in-process from transformers' own configs (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import l2a

ARCHS = ("qwen2", "qwen3", "llama")
TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=None,
    eos_token_id=None,
)


def base_config(arch: str, *, window: int | None = None, **overrides):
    """Config of a tiny base model; `window` enables HF's own sliding-window attention in every layer."""
    kw = {**TINY, **overrides}
    if arch == "qwen2":
        if window is not None:
            kw.update(use_sliding_window=True, sliding_window=window, max_window_layers=0)
        return Qwen2Config(**kw)
    if arch == "qwen3":
        if window is not None:
            kw.update(use_sliding_window=True, sliding_window=window, max_window_layers=0)
        return Qwen3Config(**{"head_dim": 16, **kw})
    if arch == "llama":
        if window is not None:
            # Llama has no sliding-window option; Mistral is the same architecture with one
            return MistralConfig(
                sliding_window=window, **{"head_dim": kw["hidden_size"] // kw["num_attention_heads"], **kw}
            )
        return LlamaConfig(**kw)
    raise ValueError(arch)


MODEL_CLASSES = {
    Qwen2Config: Qwen2ForCausalLM,
    Qwen3Config: Qwen3ForCausalLM,
    LlamaConfig: LlamaForCausalLM,
    MistralConfig: MistralForCausalLM,
}


def _make_base(arch: str, *, window: int | None = None, seed: int = 0, **overrides):
    """A tiny float32 base model in eval mode, with random (non-trivial) norms and biases too."""
    torch.manual_seed(seed)
    config = base_config(arch, window=window, **overrides)
    config._attn_implementation = "eager"
    model = MODEL_CLASSES[type(config)](config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    return model


def _randomize_routers(model: l2a.L2AForCausalLM, seed: int = 0, std: float = 0.05) -> None:
    """Router weights set to a random vector, so that the decision varies over tokens."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.has_global:
                layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=gen) * std)


def _tiny_l2a(
    arch: str = "qwen3", window: int = 6, *, random_router: bool = True, base: dict | None = None, **kwargs
):
    """A converted tiny L2A model; routers random unless `random_router=False` (then all tokens routed)."""
    model = l2a.convert_model(_make_base(arch, **(base or {})), sliding_window=window, **kwargs)
    if random_router:
        _randomize_routers(model)
    return model


@pytest.fixture
def make_base():
    """make_base(arch, *, window=None, seed=0, **config_overrides) -> tiny HF base model (eval, float32)."""
    return _make_base


@pytest.fixture
def randomize_routers():
    """randomize_routers(model, seed=0, std=0.05): router weights set to a random vector."""
    return _randomize_routers


@pytest.fixture
def tiny_l2a():
    """tiny_l2a(arch="qwen3", window=6, *, random_router=True, base=None, **convert_kwargs) -> L2A model."""
    return _tiny_l2a


def _fresh_process_env(tmp_path: Path) -> dict[str, str]:
    """Environment of a new Python process: l2a importable (not imported), no network, private HF caches."""
    env = dict(os.environ)
    src = str(Path(l2a.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
    )
    return env


@pytest.fixture
def fresh_process_env():
    """fresh_process_env(tmp_path) -> environment of a new Python process: l2a importable (not imported),
    offline, HF caches under tmp_path."""
    return _fresh_process_env
