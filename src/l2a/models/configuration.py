"""`L2AConfig`: a decoder-only transformer whose attention layers are L2A layers.

The base architecture's flavour (Qwen2/Qwen2.5, Qwen3, Llama) is kept through explicit fields:
`attention_bias` (q/k/v bias), `attention_output_bias` (o bias), `qk_norm` (per-head RMSNorm of q and k),
`mlp_bias`. RoPE settings live in `rope_parameters` as in transformers 5 (`rope_theta=` and the legacy
`rope_scaling=` keyword are accepted and folded into it by transformers).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Literal, get_args

from transformers import PreTrainedConfig

ForceRoute = Literal["all", "none", "random"]
AttentionBackend = Literal["auto", "triton", "torch"]
BaseModelType = Literal["qwen2", "qwen3", "llama"]
Method = Literal["l2a", "aha"]
RouterPenalty = Literal["squared", "l1"]

#: File written next to every saved L2A config: a copy of `l2a/models/remote_code.py`, which re-exports the
#: classes of the installed `l2a` package (the library itself is not copied).
REMOTE_CODE_FILE = "modeling_l2a.py"
#: `auto_map` of saved configs: lets `Auto*.from_pretrained(path, trust_remote_code=True)` load L2A
#: checkpoints in a process that never imported `l2a`.
REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "modeling_l2a.L2AConfig",
    "AutoModel": "modeling_l2a.L2AModel",
    "AutoModelForCausalLM": "modeling_l2a.L2AForCausalLM",
}


def write_remote_code(save_directory: str | os.PathLike) -> Path:
    """Write the remote-code shim (`REMOTE_CODE_FILE`) into `save_directory`; returns its path."""
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / REMOTE_CODE_FILE
    source = Path(__file__).with_name("remote_code.py").read_text(encoding="utf-8")
    target.write_text(source, encoding="utf-8")
    return target


class L2AConfig(PreTrainedConfig):
    r"""Configuration of an L2A model (`model_type="l2a"`).

    Base-model fields (as in `Qwen2Config` / `Qwen3Config` / `LlamaConfig`): `vocab_size`, `hidden_size`,
    `intermediate_size`, `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads`, `head_dim`,
    `hidden_act`, `max_position_embeddings`, `rms_norm_eps`, `rope_parameters`, `tie_word_embeddings`.

    Flavour fields:
        base_model_type: architecture the weights came from ("qwen2", "qwen3", "llama"); informative.
        attention_bias: q/k/v projections have a bias (Qwen2: True).
        attention_output_bias: the o projection has a bias (Llama with `attention_bias=True`).
        qk_norm: per-head RMSNorm on queries and keys before RoPE (Qwen3).
        mlp_bias: the MLP projections have a bias.

    L2A fields:
        sliding_window: keys seen by the local attention, the token itself included (W >= 1).
        router_temperature: tau in `soft = sigmoid(logit / tau)`.
        router_threshold: a token is routed to global attention when `soft >= threshold`.
        router_logit_offset: a fixed number added to every router logit: `soft = sigmoid((w·h + b) / tau)`.
            0 (the paper): zero-initialised routers start exactly on the threshold; > 0 starts them inside
            the global side (`soft = sigmoid(b / tau)` at zero weights), which keeps layers from
            switching off in the first steps of a long-context extension (docs/reproduction.md).
        global_layers: indices of the layers that keep a global branch (default: all layers);
            the others are local-only (the result of pruning).
        force_route: None (learned routing), "all" (every token uses global attention),
            "none" (global attention off: a pure sliding-window model) or "random" (each token routed
            independently with probability `random_route_fraction`: the random-routing baseline).
        random_route_fraction: probability that a token is routed under `force_route="random"` (required
            then, and only then).
        router_regularizer_weight: lambda in `loss = lm_loss + lambda * router_regularizer`;
            a forward's `router_regularizer_weight=` argument overrides it.
        attention_backend: backend of the `l2a.ops` calls ("auto": Triton on CUDA, PyTorch elsewhere).

    Method fields:
        method: "l2a" (a local branch plus a routed global branch per layer, token-wise routers) or "aha"
            (All-or-Here Attention, docs/aha.md: one attention per layer with the base projections; per token
            and query head a router picks full causal or `sliding_window` attention).
        router_penalty: form of the regulariser on the router's soft outputs: "squared" (sum of soft^2, L2A)
            or "l1" (sum of soft, AHA's paper); default by method.
        routed_heads: AHA only: per layer, the query heads that keep a router output (heads left out, or
            every head of a layer outside `global_layers`, always use window attention: head pruning).
            Default: every head of every layer in `global_layers`. Must be None for "l2a".
    """

    model_type = "l2a"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    base_model_type: BaseModelType = "llama"
    attention_bias: bool = False
    attention_output_bias: bool = False
    qk_norm: bool = False
    mlp_bias: bool = False

    sliding_window: int = 4096
    router_temperature: float = 0.1
    router_threshold: float = 0.5
    router_logit_offset: float = 0.0
    global_layers: list[int] | None = None
    force_route: ForceRoute | None = None
    random_route_fraction: float | None = None
    router_regularizer_weight: float = 0.0
    attention_backend: AttentionBackend = "auto"
    method: Method = "l2a"
    router_penalty: RouterPenalty | None = None
    routed_heads: list[list[int]] | None = None

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoConfig") -> None:
        """Nothing to register: `save_pretrained` always writes `REMOTE_CODE_AUTO_MAP` and the shim.

        transformers calls this when it loads a checkpoint through `trust_remote_code`; its own registration
        would make later saves copy l2a's source files into the checkpoint instead of the shim.
        """

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Save `config.json` with an `auto_map` pointing at the remote-code shim, which is written beside it
        (`model.save_pretrained` saves its config through here)."""
        self.auto_map = dict(REMOTE_CODE_AUTO_MAP)
        if not os.path.isfile(save_directory):  # transformers' own error for a file path comes below
            write_remote_code(save_directory)
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.routed_heads is not None:
            self.routed_heads = [sorted({int(h) for h in heads}) for heads in self.routed_heads]
            if self.global_layers is None:  # AHA: the layers with routed heads
                self.global_layers = [i for i, heads in enumerate(self.routed_heads) if heads]
        if self.global_layers is None:
            self.global_layers = list(range(self.num_hidden_layers))
        else:
            self.global_layers = sorted({int(i) for i in self.global_layers})
        if self.router_penalty is None:
            self.router_penalty = "l1" if self.method == "aha" else "squared"
        if self.method == "aha" and self.routed_heads is None and isinstance(self.num_attention_heads, int):
            heads = list(range(self.num_attention_heads))
            self.routed_heads = [
                heads if i in self.global_layers else [] for i in range(self.num_hidden_layers)
            ]
        super().__post_init__(**kwargs)
        self._validate_l2a()

    def _validate_l2a(self) -> None:
        """Clear errors for inconsistent fields; runs at construction."""
        for name in (
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "hidden_size",
            "head_dim",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.base_model_type not in get_args(BaseModelType):
            raise ValueError(
                f"base_model_type must be one of {get_args(BaseModelType)}, got {self.base_model_type!r}"
            )
        if (
            isinstance(self.sliding_window, bool)
            or not isinstance(self.sliding_window, int)
            or self.sliding_window <= 0
        ):
            raise ValueError(
                "sliding_window must be a positive int (keys seen by local attention), "
                f"got {self.sliding_window!r}"
            )
        if not self.router_temperature > 0:
            raise ValueError(f"router_temperature must be > 0, got {self.router_temperature!r}")
        if not 0.0 < self.router_threshold < 1.0:
            raise ValueError(f"router_threshold must lie in (0, 1), got {self.router_threshold!r}")
        if (
            isinstance(self.router_logit_offset, bool)
            or not isinstance(self.router_logit_offset, (int, float))
            or not math.isfinite(self.router_logit_offset)
        ):
            raise ValueError(f"router_logit_offset must be a finite number, got {self.router_logit_offset!r}")
        if self.force_route is not None and self.force_route not in get_args(ForceRoute):
            raise ValueError(
                f"force_route must be None, 'all' or 'none' (or 'random'), got {self.force_route!r}"
            )
        if (self.force_route == "random") != (self.random_route_fraction is not None):
            raise ValueError(
                "random_route_fraction is set exactly when force_route='random', got "
                f"force_route={self.force_route!r}, random_route_fraction={self.random_route_fraction!r}"
            )
        if self.random_route_fraction is not None and not 0.0 <= self.random_route_fraction <= 1.0:
            raise ValueError(f"random_route_fraction must lie in [0, 1], got {self.random_route_fraction!r}")
        if self.attention_backend not in get_args(AttentionBackend):
            raise ValueError(
                f"attention_backend must be one of {get_args(AttentionBackend)}, "
                f"got {self.attention_backend!r}"
            )
        if not self.router_regularizer_weight >= 0:
            raise ValueError(
                f"router_regularizer_weight must be >= 0, got {self.router_regularizer_weight!r}"
            )
        bad = [i for i in self.global_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"global_layers {bad} out of range for a model with {self.num_hidden_layers} layers "
                f"(valid: 0..{self.num_hidden_layers - 1})"
            )
        self._validate_method()
        if not self.rope_parameters or "rope_theta" not in self.rope_parameters:
            raise ValueError(f"rope_parameters must hold at least 'rope_theta', got {self.rope_parameters!r}")
        theta = self.rope_parameters["rope_theta"]
        positive = isinstance(theta, (int, float)) and not isinstance(theta, bool) and theta > 0
        if not (positive and math.isfinite(theta)):
            raise ValueError(f"rope_theta must be a positive number, got {theta!r}")
        limit = self.max_position_embeddings
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise ValueError(f"max_position_embeddings must be a positive int, got {limit!r}")
        if self.sliding_window > limit:
            warnings.warn(
                f"sliding_window={self.sliding_window} exceeds max_position_embeddings={limit}: the local "
                "window alone covers every position, so no token needs global attention",
                stacklevel=2,
            )

    def _validate_method(self) -> None:
        if self.method not in get_args(Method):
            raise ValueError(f"method must be one of {get_args(Method)}, got {self.method!r}")
        if self.router_penalty not in get_args(RouterPenalty):
            raise ValueError(
                f"router_penalty must be one of {get_args(RouterPenalty)}, got {self.router_penalty!r}"
            )
        if self.method == "l2a":
            if self.routed_heads is not None:
                raise ValueError("routed_heads is an AHA field (method='aha'); L2A routes whole tokens")
            return
        if len(self.routed_heads) != self.num_hidden_layers:
            raise ValueError(
                f"routed_heads must list the routed heads of each of the {self.num_hidden_layers} layers, "
                f"got {len(self.routed_heads)} entries"
            )
        for i, heads in enumerate(self.routed_heads):
            bad = [h for h in heads if not 0 <= h < self.num_attention_heads]
            if bad:
                raise ValueError(
                    f"routed_heads[{i}] has heads {bad} out of range for "
                    f"{self.num_attention_heads} query heads"
                )
            if bool(heads) != (i in self.global_layers):
                raise ValueError(
                    f"layer {i}: routed_heads[{i}]={heads} but the layer is "
                    f"{'' if i in self.global_layers else 'not '}in global_layers {self.global_layers}; "
                    "a layer has a router exactly when it has routed heads"
                )
