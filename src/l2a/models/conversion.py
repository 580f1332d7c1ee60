"""Turn a pretrained Qwen2/Qwen2.5, Qwen3 or Llama checkpoint into an L2A (or AHA) model.

The conversion is a pure state-dict mapping: for every layer the base `self_attn` weights are copied into
both the local and the global branch, `input_layernorm` also initialises `global_layernorm`, the router
starts at zero (every token routed), and embeddings, MLPs, norms and the LM head are copied unchanged.
With `method="aha"` every tensor is copied under its own name (one attention per layer, the base's) and a
zero router with one output per query head is added to each layer of `global_layers` (every head starts
on full attention).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedModel

from l2a.models.configuration import AttentionBackend, ForceRoute, L2AConfig, Method, RouterPenalty
from l2a.models.modeling import L2AForCausalLM, L2ARotaryEmbedding

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")

# Files of a checkpoint directory that belong to the tokenizer (copied verbatim by `convert_checkpoint`).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
WEIGHT_PATTERNS = (
    "*.safetensors",
    "pytorch_model*.bin",
    "*.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


def _flavour(base: PretrainedConfig) -> dict[str, Any]:
    model_type = getattr(base, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported base architecture {model_type!r} ({type(base).__name__}); "
            f"L2A conversion supports model types {SUPPORTED_MODEL_TYPES}"
        )
    layer_types = getattr(base, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(
            f"the base {model_type} model has non-full attention layers {sorted(set(layer_types))}; "
            "L2A conversion expects dense causal attention in every layer"
        )
    if model_type == "qwen2":
        return {"attention_bias": True, "attention_output_bias": False, "qk_norm": False, "mlp_bias": False}
    if model_type == "qwen3":
        bias = bool(getattr(base, "attention_bias", False))
        return {"attention_bias": bias, "attention_output_bias": bias, "qk_norm": True, "mlp_bias": False}
    bias = bool(getattr(base, "attention_bias", False))
    return {
        "attention_bias": bias,
        "attention_output_bias": bias,
        "qk_norm": False,
        "mlp_bias": bool(getattr(base, "mlp_bias", False)),
    }


def l2a_config_from_base(
    base: PretrainedConfig,
    *,
    sliding_window: int,
    rope_theta: float | None = None,
    max_position_embeddings: int | None = None,
    global_layers: list[int] | None = None,
    router_temperature: float = 0.1,
    router_threshold: float = 0.5,
    router_logit_offset: float = 0.0,
    force_route: ForceRoute | None = None,
    router_regularizer_weight: float = 0.0,
    attention_backend: AttentionBackend = "auto",
    method: Method = "l2a",
    router_penalty: RouterPenalty | None = None,
) -> L2AConfig:
    """The `L2AConfig` of a base Qwen2/Qwen3/Llama config, with the L2A fields and optional RoPE overrides."""
    flavour = _flavour(base)
    rope_parameters = copy.deepcopy(getattr(base, "rope_parameters", None) or {})
    if not rope_parameters:
        rope_parameters = {"rope_type": "default", "rope_theta": getattr(base, "rope_theta", 10000.0)}
    if rope_theta is not None:
        rope_parameters["rope_theta"] = float(rope_theta)
    head_dim = getattr(base, "head_dim", None) or base.hidden_size // base.num_attention_heads
    return L2AConfig(
        vocab_size=base.vocab_size,
        hidden_size=base.hidden_size,
        intermediate_size=base.intermediate_size,
        num_hidden_layers=base.num_hidden_layers,
        num_attention_heads=base.num_attention_heads,
        num_key_value_heads=base.num_key_value_heads or base.num_attention_heads,
        head_dim=head_dim,
        hidden_act=base.hidden_act,
        max_position_embeddings=max_position_embeddings or base.max_position_embeddings,
        initializer_range=base.initializer_range,
        rms_norm_eps=base.rms_norm_eps,
        tie_word_embeddings=bool(getattr(base, "tie_word_embeddings", False)),
        rope_parameters=rope_parameters,
        pad_token_id=base.pad_token_id,
        bos_token_id=base.bos_token_id,
        eos_token_id=base.eos_token_id,
        base_model_type=base.model_type,
        **flavour,
        sliding_window=sliding_window,
        router_temperature=router_temperature,
        router_threshold=router_threshold,
        router_logit_offset=router_logit_offset,
        global_layers=global_layers,
        force_route=force_route,
        router_regularizer_weight=router_regularizer_weight,
        attention_backend=attention_backend,
        method=method,
        router_penalty=router_penalty,
        dtype=getattr(base, "dtype", None),
    )


def convert_state_dict(base_state: dict[str, torch.Tensor], config: L2AConfig) -> dict[str, torch.Tensor]:
    """Map a base causal-LM state dict to the L2A (or AHA) one (new tensors; the base is left untouched)."""
    if config.method == "aha":
        return _convert_state_dict_aha(base_state, config)
    out: dict[str, torch.Tensor] = {}
    global_layers = set(config.global_layers)
    for key, tensor in base_state.items():
        parts = key.split(".")
        if parts[:2] != ["model", "layers"]:
            out[key] = tensor.clone()
            continue
        layer, rest = int(parts[2]), parts[3:]
        prefix = f"model.layers.{layer}."
        if rest[0] == "self_attn":
            name = ".".join(rest[1:])
            out[prefix + "local_attn." + name] = tensor.clone()
            if layer in global_layers:
                out[prefix + "global_attn." + name] = tensor.clone()
        elif rest[0] == "input_layernorm":
            out[key] = tensor.clone()
            if layer in global_layers:
                out[prefix + "global_layernorm." + ".".join(rest[1:])] = tensor.clone()
        else:
            out[key] = tensor.clone()
    for layer in sorted(global_layers):
        ref = out[f"model.layers.{layer}.input_layernorm.weight"]
        router = torch.zeros(1, config.hidden_size, dtype=ref.dtype, device=ref.device)
        out[f"model.layers.{layer}.router.weight"] = router
    return out


def _convert_state_dict_aha(
    base_state: dict[str, torch.Tensor], config: L2AConfig
) -> dict[str, torch.Tensor]:
    """AHA keeps the base names; each routed layer gets a zero router with one row per routed head."""
    out = {key: tensor.clone() for key, tensor in base_state.items()}
    for layer in config.global_layers:
        ref = out[f"model.layers.{layer}.input_layernorm.weight"]
        heads = len(config.routed_heads[layer])
        out[f"model.layers.{layer}.router.weight"] = torch.zeros(
            heads, config.hidden_size, dtype=ref.dtype, device=ref.device
        )
    return out


def convert_model(
    base_model: PreTrainedModel,
    *,
    sliding_window: int,
    rope_theta: float | None = None,
    max_position_embeddings: int | None = None,
    global_layers: list[int] | None = None,
    router_temperature: float = 0.1,
    router_threshold: float = 0.5,
    router_logit_offset: float = 0.0,
    force_route: ForceRoute | None = None,
    router_regularizer_weight: float = 0.0,
    attention_backend: AttentionBackend = "auto",
    method: Method = "l2a",
    router_penalty: RouterPenalty | None = None,
) -> L2AForCausalLM:
    """Build an `L2AForCausalLM` from a Qwen2/Qwen3/Llama causal LM (on the base model's device and dtype).

    Args:
        base_model: e.g. `AutoModelForCausalLM.from_pretrained(...)` of a supported architecture.
        sliding_window: local attention window W (keys seen, the token itself included).
        method: "l2a" (local + routed global branch, token-wise routers) or "aha" (the base attention with a
            per-head choice of full or window attention; docs/aha.md).
        router_penalty: "squared" or "l1" regulariser on the router's soft outputs (default: "squared" for
            L2A, "l1" for AHA).
        rope_theta, max_position_embeddings: RoPE overrides (long-context extension); default: the base's.
        global_layers: layers keeping a global branch (default all).
        router_temperature, router_threshold, router_logit_offset, force_route, router_regularizer_weight,
            attention_backend: the `L2AConfig` fields of the same names.
    """
    config = l2a_config_from_base(
        base_model.config,
        sliding_window=sliding_window,
        rope_theta=rope_theta,
        max_position_embeddings=max_position_embeddings,
        global_layers=global_layers,
        router_temperature=router_temperature,
        router_threshold=router_threshold,
        router_logit_offset=router_logit_offset,
        force_route=force_route,
        router_regularizer_weight=router_regularizer_weight,
        attention_backend=attention_backend,
        method=method,
        router_penalty=router_penalty,
    )
    state = convert_state_dict(base_model.state_dict(), config)
    ref = next(base_model.parameters())
    with torch.device("meta"):
        model = L2AForCausalLM(config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    result = model.load_state_dict(state, strict=False, assign=True)
    unset = [
        name for name in result.missing_keys if not (config.tie_word_embeddings and name == "lm_head.weight")
    ]
    if unset or result.unexpected_keys:
        raise RuntimeError(
            f"state-dict mapping mismatch: unset {unset[:8]}, unexpected {result.unexpected_keys[:8]}"
        )
    # non-persistent buffers (RoPE tables) are not in the state dict: build them on the real device
    model.model.rotary_emb = L2ARotaryEmbedding(config, device=ref.device)
    model.tie_weights()
    if getattr(base_model, "generation_config", None) is not None:
        model.generation_config = copy.deepcopy(base_model.generation_config)
    return model.train(base_model.training)


def _check_checkpoint_dir(base_dir: Path) -> None:
    if not base_dir.is_dir():
        raise FileNotFoundError(f"base checkpoint directory {str(base_dir)!r} does not exist")
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in base checkpoint directory {str(base_dir)!r}")
    if not any(any(base_dir.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise FileNotFoundError(
            "no weight files (*.safetensors or pytorch_model*.bin) in base checkpoint directory "
            f"{str(base_dir)!r}"
        )


def convert_checkpoint(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    window: int,
    rope_theta: float | None = None,
    max_position_embeddings: int | None = None,
    dtype: torch.dtype | str | None = None,
    force: bool = False,
    method: Method = "l2a",
    router_logit_offset: float = 0.0,
) -> Path:
    """Load a base checkpoint, convert it, and save the L2A model (safetensors), tokenizer files and
    generation config to `out_dir`.

    Args:
        base_dir: local Qwen2/Qwen3/Llama checkpoint directory (config.json + weights).
        out_dir: destination; must be empty or absent unless `force`, and never `base_dir` itself.
        window: local attention window.
        rope_theta, max_position_embeddings: RoPE overrides.
        dtype: weight dtype of the saved model (e.g. torch.bfloat16 or "bfloat16"); default: the checkpoint's.
        force: write into a non-empty `out_dir`.
        method: "l2a" or "aha" (`convert_model`).
        router_logit_offset: `L2AConfig.router_logit_offset` (0: the paper's routers on the threshold).

    Returns:
        The output directory.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    _check_checkpoint_dir(base_dir)
    if out_dir.resolve() == base_dir.resolve():
        raise ValueError(
            f"output directory {str(out_dir)!r} is the input checkpoint; refusing to overwrite it"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output path {str(out_dir)!r} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(
            f"output directory {str(out_dir)!r} is not empty (use force=True / --force to write into it)"
        )
    base_config = AutoConfig.from_pretrained(base_dir)
    _flavour(base_config)
    if isinstance(dtype, str):
        if dtype != "auto" and not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype if dtype is not None else "auto")
    model = convert_model(
        base,
        sliding_window=window,
        rope_theta=rope_theta,
        max_position_embeddings=max_position_embeddings,
        method=method,
        router_logit_offset=router_logit_offset,
    )
    del base
    if (base_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(base_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out_dir / name)
    return out_dir
