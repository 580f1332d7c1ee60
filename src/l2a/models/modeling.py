"""HF model classes of L2A: `L2AModel` (decoder stack) and `L2AForCausalLM` (with LM head, loss, generate()).

Legend: B batch, N new tokens, P tokens already in the cache.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

from l2a.layers import L2ADecoderLayer, RMSNorm, Router
from l2a.layers.aha import AHADecoderLayer
from l2a.models._compat import CACHE_FIELD, CACHE_KWARG, pick_cache
from l2a.models.aha_cache import AHACache, new_cache
from l2a.models.cache import L2ACache
from l2a.models.configuration import L2AConfig
from l2a.models.outputs import L2ACausalLMOutputWithPast, L2AModelOutputWithPast
from l2a.ops.linear_cross_entropy import LossImpl, linear_cross_entropy, resolve_loss_impl
from l2a.ops.linear_cross_entropy import shift_labels as shift_labels_of

#: Attribute set on an `L2ACache` whose prompt had right padding: it cannot be continued.
_RIGHT_PADDED = "l2a_right_padded"
#: HF's flash-attention packing keywords (`DataCollatorWithFlattening(return_flash_attn_kwargs=True)`).
_PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


class L2ARotaryEmbedding(nn.Module):
    """RoPE cos/sin tables from `config.rope_parameters` (default or any HF rope type)."""

    inv_freq: torch.Tensor

    def __init__(self, config: L2AConfig, device: torch.device | None = None):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        if self.rope_type == "default":
            init_fn = self.compute_default_rope_parameters
        elif self.rope_type in ROPE_INIT_FUNCTIONS:
            init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        else:
            raise ValueError(
                f"unknown rope_type {self.rope_type!r}; known: default, {sorted(ROPE_INIT_FUNCTIONS)}"
            )
        inv_freq, self.attention_scaling = init_fn(config, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(
        config: L2AConfig, device: torch.device | None = None, seq_len: int | None = None
    ) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, N) -> cos, sin (B, N, D) in x's dtype."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


class L2APreTrainedModel(PreTrainedModel):
    config_class = L2AConfig
    config: L2AConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["L2ADecoderLayer", "AHADecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = False
    _supports_sdpa = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Router):
            init.zeros_(module.weight)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel") -> None:
        """Nothing to register: saved configs always carry the `auto_map` of the remote-code shim (see
        `L2AConfig.save_pretrained`); transformers calls this when loading through `trust_remote_code`."""

    def _check_and_adjust_attn_implementation(self, attn_implementation: str | None, *args, **kwargs) -> str:
        """transformers' `attn_implementation=` hook. L2A attention always runs through `l2a.ops`, with the
        kernels picked by `config.attention_backend`: HF's "eager" (the model's own attention code)."""
        if attn_implementation in (None, "eager"):
            return "eager"
        raise ValueError(
            f"L2A models do not take attn_implementation={attn_implementation!r}: their attention kernels "
            "are chosen by the config field `attention_backend` ('auto', 'triton' or 'torch'), e.g. "
            "`from_pretrained(path, attention_backend='triton')`; leave attn_implementation unset or 'eager'."
        )


def _cu_seqlens_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Document boundaries of a packed row from its position ids (1, N): a document starts wherever the
    position is not the previous one + 1 (HF's rule, as `DataCollatorWithFlattening` packs).

    Returns int32 (N + 1,): the starts, then N repeated (trailing empty documents), so that the length does
    not depend on the data and no host sync is needed.
    """
    pos = position_ids[0]
    n = pos.shape[0]
    starts = torch.ones(n, dtype=torch.bool, device=pos.device)
    starts[1:] = pos[1:] != pos[:-1] + 1
    slot = torch.where(starts, torch.cumsum(starts, 0) - 1, n + 1)  # non-starts go to a spill slot
    cu_seqlens = torch.full((n + 2,), n, dtype=torch.int32, device=pos.device)
    cu_seqlens.scatter_(0, slot, torch.arange(n, dtype=torch.int32, device=pos.device))
    return cu_seqlens[: n + 1]


def _flash_cu_seqlens(cu_seq_lens_q: torch.Tensor | None, cu_seq_lens_k: torch.Tensor | None) -> torch.Tensor:
    """HF's flash-attention packing keywords (self-attention: the same boundaries for queries and keys)."""
    if cu_seq_lens_q is None or cu_seq_lens_k is None:
        raise ValueError("pass both cu_seq_lens_q and cu_seq_lens_k (packed documents), or cu_seqlens")
    if cu_seq_lens_q is not cu_seq_lens_k and not torch.equal(cu_seq_lens_q, cu_seq_lens_k.to(cu_seq_lens_q)):
        raise ValueError("cu_seq_lens_q and cu_seq_lens_k must be equal: L2A layers run self-attention")
    return cu_seq_lens_q


def _check_padding_mask(mask: torch.Tensor) -> bool:
    """mask (B, N) of 0/1 on an empty cache -> whether some row ends with padding (right padding).

    Raises when a row has a hole (its 1s are not contiguous): only left and right padding are supported.
    One host sync; under torch.compile a device-side assert takes its place (and right padding is not
    reported).
    """
    n = mask.shape[-1]
    ones = mask.sum(-1)
    first = mask.argmax(-1)
    last = n - 1 - mask.flip(-1).argmax(-1)
    contiguous = ((ones == 0) | (last - first + 1 == ones)).all()
    message = (
        "attention_mask has a hole (a 0 between 1s in a row): only left padding (generation) and right "
        "padding are supported; pack documents with cu_seqlens or position_ids instead"
    )
    if torch.compiler.is_compiling():
        torch._assert_async(contiguous, message)
        return False
    contiguous, right_padded = torch.stack([contiguous, (mask[:, -1] == 0).any()]).tolist()
    if not contiguous:
        raise ValueError(message)
    return right_padded


def _document_positions(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """Position of each token inside its packed document: (1, N)."""
    idx = torch.arange(n, device=cu_seqlens.device)
    starts = cu_seqlens.long()
    doc = torch.bucketize(idx, starts[1:], right=True)
    return (idx - starts[doc]).unsqueeze(0)


def _router_statistics(
    decisions: list[tuple[torch.Tensor, torch.Tensor]],
    valid: torch.Tensor | None,
    device: torch.device,
    penalty: str = "squared",
) -> tuple[torch.Tensor, torch.Tensor]:
    """decisions: per global layer (soft float32, hard bool), each (B, N) or (B, N, H); valid: bool (B, N).

    Returns router_fraction (num_global_layers,) and the regulariser (scalar): sum of soft^2 (`penalty`
    "squared") or of soft ("l1") over the valid tokens (and heads) of each sequence, mean over the batch,
    mean over layers.
    """
    if not decisions:
        return torch.zeros(0, device=device), torch.zeros((), device=device)
    # all layers at once (L, B, N[, H]): a handful of kernels per forward instead of ~5 per layer, which
    # cost ~0.2 ms of a 7 ms decode step at the Qwen2.5-7B shape
    soft = torch.stack([s for s, _ in decisions])
    routed = torch.stack([h for _, h in decisions]).float()
    soft2 = soft if penalty == "l1" else soft.square()
    if soft.dim() == 4:
        routed = routed.mean(-1)
        soft2 = soft2.sum(-1)
    if valid is not None:
        weight = valid.to(routed.dtype)
        fractions = (routed * weight).sum((1, 2)) / weight.sum().clamp_min(1.0)
        soft2 = soft2 * weight
    else:
        fractions = routed.mean((1, 2))
    return fractions.detach(), soft2.sum(-1).mean(-1).mean()


def _head_fractions(
    decisions: list[tuple[torch.Tensor, torch.Tensor]], valid: torch.Tensor | None
) -> torch.Tensor | None:
    """Fraction of valid tokens routed per head, (num_global_layers, H), for head-wise decisions (B, N, H);
    None for token-wise ones or no global layer."""
    if not decisions or decisions[0][1].dim() != 3:
        return None
    rows = []
    for _, hard in decisions:
        routed = hard.float()
        if valid is None:
            rows.append(routed.mean((0, 1)))
        else:
            weight = valid.to(routed.dtype)[..., None]
            rows.append((routed * weight).sum((0, 1)) / weight.sum().clamp_min(1.0))
    return torch.stack(rows).detach()


def _refuse_assisted_generation(generation_config: GenerationConfig, generation_mode: object) -> None:
    """Assisted / speculative decoding (an assistant model, prompt lookup, early exit) rolls the cache back
    with `crop()`, which `L2ACache` cannot do; refuse before the first token instead of failing mid-way."""
    assistant = getattr(generation_config, "is_assistant", False)
    if generation_mode == GenerationMode.ASSISTED_GENERATION or assistant:
        raise ValueError(
            "assisted / speculative decoding (assistant_model, prompt_lookup_num_tokens, "
            "assistant_early_exit, or an L2A model as the assistant) is not supported: L2ACache cannot "
            "roll back (crop) rejected tokens"
        )


class L2AModel(L2APreTrainedModel):
    """Embeddings, L2A decoder layers and the final norm."""

    def __init__(self, config: L2AConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        layer_class = AHADecoderLayer if config.method == "aha" else L2ADecoderLayer
        self.layers = nn.ModuleList([layer_class(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = L2ARotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: L2ACache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        global_leakage: bool = False,
        cache: L2ACache | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
    ) -> L2AModelOutputWithPast | tuple:
        """Run the decoder stack.

        Args:
            input_ids: (B, N), or inputs_embeds (B, N, hidden); N >= 1.
            attention_mask: 2-D (B, P + N), 1 for real tokens, 0 for padding; left padding (generation) or
                right padding (not continued with a cache). A row with a hole (0 between 1s) is refused;
                it is checked (one host sync) while the cache is empty, not in cached decoding steps,
                whose new columns must be 1 (as `generate()` passes them).
            position_ids: (B, N); by default from the attention mask (as HF generate does), from `cu_seqlens`
                (restarting per document) or P..P+N-1. With B = 1, no attention mask and no cache, a packed
                row is recognised by its position ids alone (HF's `DataCollatorWithFlattening`): a new
                document starts wherever a position is not the previous one + 1.
            past_key_values: an `L2ACache` (created when `use_cache` and none is given); newer transformers
                releases pass it as `cache`, which is accepted too. With a static cache (`max_length`), the
                forwards after the prompt are static steps: the padding is the prompt's and the attention
                mask is not read.
            cu_seqlens: int (num_docs + 1) cumulative document lengths of a packed batch (B = 1, no cache).
                HF's flash-attention keywords `cu_seq_lens_q` / `cu_seq_lens_k` (equal) are accepted for it;
                `max_length_q` / `max_length_k`, which come with them, are not needed by the l2a kernels.
            global_leakage: global attention computed densely for all tokens (still multiplied by the
                decision), so the router gets a gradient for tokens it switched off.
            output_attentions: refused (also when set in the config): the l2a ops return no weights.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be 2-D (batch, seqlen), got shape {tuple(input_ids.shape)}"
                + ("; for one sequence pass input_ids[None]" if input_ids.dim() == 1 else "")
            )
        if inputs_embeds is not None and inputs_embeds.dim() != 3:
            raise ValueError(
                f"inputs_embeds must be 3-D (batch, seqlen, hidden), got shape {tuple(inputs_embeds.shape)}"
            )
        past_key_values = pick_cache(past_key_values, cache)
        output_attentions = (
            output_attentions if output_attentions is not None else self.config.output_attentions
        )
        if output_attentions:
            raise ValueError(
                "output_attentions is not supported (argument or config): the l2a attention ops do not "
                "return attention weights"
            )
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, n = inputs_embeds.shape[:2]
        if n == 0:
            raise ValueError("the input has no tokens (seqlen 0); pass at least one token per row")
        device = inputs_embeds.device

        if cu_seq_lens_q is not None or cu_seq_lens_k is not None:
            if cu_seqlens is not None:
                raise ValueError("pass cu_seqlens or cu_seq_lens_q/cu_seq_lens_k, not both")
            cu_seqlens = _flash_cu_seqlens(cu_seq_lens_q, cu_seq_lens_k)
        elif (max_length_q, max_length_k) != (None, None):
            raise ValueError("max_length_q / max_length_k come with cu_seq_lens_q / cu_seq_lens_k")
        if (
            cu_seqlens is None
            and position_ids is not None
            and batch == 1
            and attention_mask is None
            and past_key_values is None
            and not use_cache
        ):
            position_ids = position_ids.to(device).reshape(1, n)
            cu_seqlens = _cu_seqlens_from_positions(position_ids)

        if use_cache is None:
            use_cache = self.config.use_cache and not self.training and cu_seqlens is None
        if use_cache and past_key_values is None:
            past_key_values = new_cache(self.config)
        if past_key_values is not None and not isinstance(past_key_values, L2ACache):
            raise TypeError(
                f"past_key_values must be an L2ACache, got {type(past_key_values).__name__}; "
                "L2A layers keep separate local and global caches"
            )
        if past_key_values is not None and (self.config.method == "aha") != isinstance(
            past_key_values, AHACache
        ):
            raise TypeError(
                f"past_key_values: a {self.config.method} model needs an "
                f"{'AHACache' if self.config.method == 'aha' else 'L2ACache'}, "
                f"got {type(past_key_values).__name__}"
            )
        if past_key_values is not None and self.gradient_checkpointing and self.training:
            raise ValueError("a KV cache cannot be used with gradient checkpointing in training")
        # a static cache's decode step: positions and padding come from the cache, on the device
        static_step = past_key_values is not None and past_key_values.static_step(n)
        past = 0 if static_step or past_key_values is None else past_key_values.get_seq_length()
        # a static step reports no past length, but continues the prompt all the same
        if (past or static_step) and getattr(past_key_values, _RIGHT_PADDED, False):
            raise ValueError(
                "the cache holds a right-padded batch (a row ended with padding), which cannot be continued: "
                "pad on the left for generation (tokenizer.padding_side = 'left')"
            )

        if cu_seqlens is not None:
            if past_key_values is not None:
                raise ValueError("cu_seqlens (packed documents) cannot be combined with a KV cache")
            if attention_mask is not None:
                raise ValueError(
                    "pass either cu_seqlens (packed documents) or attention_mask (padding), not both"
                )
            cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)

        key_start = valid = None
        if static_step:  # the padding was fixed by the prompt; an attention mask adds nothing here
            key_start, step_positions = past_key_values.step_positions(n)
            position_ids = step_positions if position_ids is None else position_ids
        elif attention_mask is not None:
            if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, past + n):
                raise ValueError(
                    f"attention_mask must be a 2-D (batch, past + new tokens) = ({batch}, {past + n}) "
                    f"padding mask, got shape {tuple(attention_mask.shape)}"
                )
            mask = attention_mask.to(device=device, dtype=torch.long)
            if past == 0:
                right_padded = _check_padding_mask(mask)
                if past_key_values is not None:
                    setattr(past_key_values, _RIGHT_PADDED, right_padded)
            # number of leading pad tokens = first valid position of each row
            key_start = (mask.cumsum(-1) == 0).sum(-1)
            valid = mask[:, past:].bool()
            if position_ids is None:
                position_ids = (mask.cumsum(-1) - 1).clamp_min(0)[:, past:]
        if past_key_values is not None and not static_step:
            past_key_values.record_padding(key_start, batch, device)
        if position_ids is None:
            if cu_seqlens is not None:
                position_ids = _document_positions(cu_seqlens, n)
            else:
                position_ids = torch.arange(past, past + n, device=device).unsqueeze(0)
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        position_ids = position_ids.to(device).expand(batch, -1)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden_states = () if output_hidden_states else None
        decisions = []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, soft, hard = layer(
                hidden_states,
                position_embeddings,
                cu_seqlens=cu_seqlens,
                key_start=key_start,
                layer_cache=past_key_values.layers[i] if past_key_values is not None else None,
                global_leakage=global_leakage,
            )
            if soft is not None:
                decisions.append((soft, hard))
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        router_fraction, router_regularizer = _router_statistics(
            decisions, valid, device, self.config.router_penalty
        )
        output = L2AModelOutputWithPast(
            last_hidden_state=hidden_states,
            **{CACHE_FIELD: past_key_values if use_cache else None},
            hidden_states=all_hidden_states,
            router_fraction=router_fraction,
            router_regularizer=router_regularizer,
            router_head_fraction=_head_fractions(decisions, valid),
        )
        return output if return_dict else output.to_tuple()


class L2AForCausalLM(L2APreTrainedModel, GenerationMixin):
    """L2A decoder with an LM head. Loss: `lm_loss + lambda * router_regularizer` when labels are given."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: L2AConfig):
        super().__init__(config)
        self.model = L2AModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: L2ACache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cu_seqlens: torch.Tensor | None = None,
        global_leakage: bool = False,
        router_regularizer_weight: float | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        cache: L2ACache | None = None,
        shift_labels: torch.LongTensor | None = None,
        loss_impl: LossImpl = "auto",
        **kwargs,
    ) -> L2ACausalLMOutputWithPast | tuple:
        """Arguments as `L2AModel.forward`, plus:

        labels: (B, N) next-token targets as in HF (shifted inside the loss; -100 ignored).
        shift_labels: (B, N) targets already shifted (position t's own target), instead of `labels`; for
            sequence shards whose last target lies in the next shard (context parallelism).
        logits_to_keep: int k > 0 computes logits of the last k positions only; a 1-D tensor selects
            positions.
        router_regularizer_weight: lambda; defaults to `config.router_regularizer_weight`.
        num_items_in_batch: token count for HF's loss normalisation under gradient accumulation.
        loss_impl: with labels, "plain" computes the logits and HF's loss from them (and returns the
            logits); "liger" / "chunked" fuse the LM head into the loss and return logits=None; "auto" is, in
            training mode, "liger" on CUDA when Liger-Kernel is installed, else "chunked"
            (`l2a.ops.linear_cross_entropy`), and "plain" in eval mode.
        kwargs: HF's flash-attention packing keywords `cu_seq_lens_q`, `cu_seq_lens_k`, `max_length_q`,
            `max_length_k` (see `L2AModel.forward`); any other keyword is a TypeError.
        """
        unknown = sorted(set(kwargs) - set(_PACKING_KWARGS))
        if unknown:
            raise TypeError(f"{type(self).__name__}.forward() got unexpected keyword arguments {unknown}")
        packing_kwargs = {name: kwargs[name] for name in _PACKING_KWARGS if name in kwargs}
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=pick_cache(past_key_values, cache),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            cu_seqlens=cu_seqlens,
            global_leakage=global_leakage,
            **packing_kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if labels is not None and shift_labels is not None:
            raise ValueError("pass labels or shift_labels, not both")
        has_labels = labels is not None or shift_labels is not None
        # "auto" fuses only in training (as Liger's HF patches do): evaluation with labels keeps HF's
        # contract of returning the logits.
        fuse = has_labels and (loss_impl != "auto" or self.training)
        impl = resolve_loss_impl(loss_impl, hidden_states.device) if fuse else "plain"
        if impl != "plain" and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError(
                f"logits_to_keep needs loss_impl='plain' when labels are given, got {loss_impl!r}"
            )
        if isinstance(logits_to_keep, int):
            if logits_to_keep > 0:
                hidden_states = hidden_states[:, -logits_to_keep:]
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states) if impl == "plain" else None

        lm_loss = loss = None
        if has_labels:
            if impl == "plain":
                lm_loss = self.loss_function(
                    logits=logits,
                    labels=labels,
                    shift_labels=shift_labels,
                    vocab_size=self.config.vocab_size,
                    num_items_in_batch=num_items_in_batch,
                )
            else:
                lm_loss = linear_cross_entropy(
                    hidden_states,
                    self.lm_head.weight,
                    shift_labels if shift_labels is not None else shift_labels_of(labels),
                    bias=self.lm_head.bias,
                    num_items_in_batch=num_items_in_batch,
                    impl=impl,
                )
            weight = (
                self.config.router_regularizer_weight
                if router_regularizer_weight is None
                else router_regularizer_weight
            )
            loss = lm_loss + weight * outputs.router_regularizer if weight else lm_loss
        output = L2ACausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
            hidden_states=outputs.hidden_states,
            lm_loss=lm_loss,
            router_regularizer=outputs.router_regularizer,
            router_fraction=outputs.router_fraction,
            router_head_fraction=outputs.router_head_fraction,
        )
        return output if return_dict else output.to_tuple()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() hook: give generation an `L2ACache` (HF would build a `DynamicCache`)."""
        _refuse_assisted_generation(generation_config, args[0] if args else kwargs.get("generation_mode"))
        cache = model_kwargs.get(CACHE_KWARG)
        if cache is not None and not isinstance(cache, L2ACache):
            raise TypeError(f"past_key_values must be an L2ACache, got {type(cache).__name__}")
        if cache is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        implementation = generation_config.cache_implementation
        if implementation not in (None, "dynamic", "static"):
            raise ValueError(
                f"cache_implementation={implementation!r} is not supported by L2A models; they use their "
                "own L2ACache ('dynamic', or 'static': global caches sized once for the generation)"
            )
        if self.config.method == "aha":
            if implementation == "static":
                raise ValueError("AHA models use the dynamic AHACache (leave cache_implementation unset)")
            model_kwargs[CACHE_KWARG] = new_cache(self.config)
            return
        # HF passes (generation_mode, batch_size, max_cache_length) after model_kwargs
        max_length = kwargs.get("max_cache_length", args[2] if len(args) > 2 else None)
        model_kwargs[CACHE_KWARG] = L2ACache(self.config, max_length if implementation == "static" else None)
