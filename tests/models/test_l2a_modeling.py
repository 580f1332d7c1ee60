"""L2AForCausalLM: save/load, router statistics and regulariser, loss, leakage, packing, padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForCausalLM, DynamicCache

import l2a
from l2a.models._compat import cache_kwargs, enable_activation_checkpointing
from l2a.models.modeling import _router_statistics


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_save_and_load_with_auto_class(arch, tiny_l2a, tmp_path):
    model = tiny_l2a(arch, window=5)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, l2a.L2AForCausalLM)
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    backbone = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(backbone, l2a.L2AModel)
    with torch.no_grad():
        hidden = backbone(ids).last_hidden_state
        torch.testing.assert_close(hidden, model.model(ids).last_hidden_state, atol=0, rtol=0)
    for field in (
        "base_model_type",
        "attention_bias",
        "qk_norm",
        "sliding_window",
        "global_layers",
        "rope_parameters",
    ):
        assert getattr(loaded.config, field) == getattr(model.config, field), field


def test_fresh_model_has_zero_routers_and_tied_head():
    config = l2a.L2AConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        tie_word_embeddings=True,
        sliding_window=4,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4},
    )
    model = l2a.L2AForCausalLM(config)
    assert all(torch.count_nonzero(layer.router.weight) == 0 for layer in model.model.layers)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_router_statistics_hand_case():
    soft = torch.tensor([[0.9, 0.2, 0.6], [0.7, 0.4, 0.1]])
    valid = torch.tensor([[True, True, True], [False, True, True]])
    layer2 = torch.full((2, 3), 0.5)
    fraction, reg = _router_statistics(
        [(soft, soft >= 0.5), (layer2, layer2 >= 0.5)], valid, torch.device("cpu")
    )
    # layer 1: routed valid tokens 0.9, 0.6 of 5 valid; layer 2: all 5 routed
    torch.testing.assert_close(fraction, torch.tensor([2 / 5, 1.0]))
    # per sequence sum of soft^2 over valid tokens: (0.81 + 0.04 + 0.36, 0.16 + 0.01), (0.75, 0.5)
    torch.testing.assert_close(reg, torch.tensor(((1.21 + 0.17) / 2 + (0.75 + 0.5) / 2) / 2))
    empty_fraction, empty_reg = _router_statistics([], None, torch.device("cpu"))
    assert empty_fraction.shape == (0,) and empty_reg.item() == 0.0


@pytest.mark.parametrize("force_route", [None, "none"])
def test_zero_router_statistics_respect_padding(force_route, tiny_l2a):
    model = tiny_l2a("qwen2", window=4, random_router=False, force_route=force_route)
    ids = torch.randint(1, 300, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    out = model(ids, attention_mask=mask)
    expected_fraction = 1.0 if force_route is None else 0.0
    torch.testing.assert_close(out.router_fraction, torch.full((2,), expected_fraction))
    # soft = sigmoid(0) = 0.5 everywhere: 0.25 * valid tokens, mean over the batch (8 and 5)
    torch.testing.assert_close(out.router_regularizer, torch.tensor(0.25 * (8 + 5) / 2))


def test_router_fraction_matches_router_decisions(tiny_l2a):
    model = tiny_l2a("qwen3", window=4)
    decisions = []
    hooks = [
        layer.router.register_forward_hook(lambda mod, args, out: decisions.append(out))
        for layer in model.model.layers
    ]
    ids = torch.randint(1, 300, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0
    out = model(ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    valid = mask.bool()
    expected = torch.stack([d.hard[valid].float().mean() for d in decisions])
    torch.testing.assert_close(out.router_fraction, expected)
    assert expected.min() > 0.0 and expected.max() < 1.0, "routers must make mixed decisions here"
    expected_reg = torch.stack([(d.soft.square() * valid).sum(-1).mean() for d in decisions]).mean()
    torch.testing.assert_close(out.router_regularizer, expected_reg)


def test_loss_is_lm_loss_plus_weighted_regularizer(tiny_l2a):
    model = tiny_l2a("llama", window=4)
    ids = torch.randint(0, 300, (2, 10))
    out = model(ids, labels=ids, loss_impl="plain")
    expected_lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, 300), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, expected_lm)
    torch.testing.assert_close(out.loss, out.lm_loss)
    weighted = model(ids, labels=ids, router_regularizer_weight=0.3)
    torch.testing.assert_close(weighted.loss, out.lm_loss + 0.3 * out.router_regularizer)
    model.config.router_regularizer_weight = 0.1
    torch.testing.assert_close(model(ids, labels=ids).loss, out.lm_loss + 0.1 * out.router_regularizer)
    assert model(ids).loss is None and model(ids).lm_loss is None


def test_training_forward_uses_hard_decision_and_trains_router(tiny_l2a):
    model = tiny_l2a("qwen3", window=4)
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        eval_logits = model(ids).logits
    model.train()
    out = model(ids, labels=ids, router_regularizer_weight=1e-2, loss_impl="plain")
    torch.testing.assert_close(out.logits, eval_logits, atol=1e-6, rtol=0)
    out.loss.backward()
    assert all(layer.router.weight.grad.abs().sum() > 0 for layer in model.model.layers)


def test_global_leakage_same_forward_more_router_gradient(tiny_l2a):
    model = tiny_l2a("qwen2", window=3).train()
    ids = torch.randint(0, 300, (1, 16))
    grads, logits = [], []
    for leakage in (False, True):
        model.zero_grad()
        out = model(ids, labels=ids, global_leakage=leakage, loss_impl="plain")
        out.lm_loss.backward()
        logits.append(out.logits.detach())
        grads.append(torch.cat([layer.router.weight.grad.flatten() for layer in model.model.layers]))
    torch.testing.assert_close(logits[1], logits[0], atol=1e-6, rtol=0)
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize(
    "give_positions", [True, False], ids=["positions-given", "positions-from-cu_seqlens"]
)
def test_packed_documents_equal_separate_runs(give_positions, tiny_l2a):
    model = tiny_l2a("qwen3", window=4)
    docs = [torch.randint(0, 300, (1, 7)), torch.randint(0, 300, (1, 9))]
    packed = torch.cat(docs, dim=1)
    cu_seqlens = torch.tensor([0, 7, 16])
    positions = torch.cat([torch.arange(7), torch.arange(9)]).unsqueeze(0) if give_positions else None
    with torch.no_grad():
        out = model(packed, position_ids=positions, cu_seqlens=cu_seqlens)
        separate = [model(d) for d in docs]
    torch.testing.assert_close(out.logits, torch.cat([s.logits for s in separate], dim=1), atol=1e-5, rtol=0)
    expected_reg = sum(s.router_regularizer for s in separate)  # one packed sequence holds both documents
    torch.testing.assert_close(out.router_regularizer, expected_reg)


def test_left_padding_equals_unpadded(tiny_l2a):
    model = tiny_l2a("qwen2", window=4)
    ids = torch.randint(1, 300, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, 4:]).logits
    torch.testing.assert_close(padded[1, 4:], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_same_gradients(use_reentrant, tiny_l2a):
    model = tiny_l2a("qwen3", window=4).train()
    ids = torch.randint(0, 300, (1, 10))
    model(ids, labels=ids, router_regularizer_weight=0.01).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    enable_activation_checkpointing(model, use_reentrant=use_reentrant)
    model(ids, labels=ids, router_regularizer_weight=0.01).loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_hidden_states_output(tiny_l2a):
    model = tiny_l2a("qwen2", window=4)
    out = model(torch.randint(0, 300, (1, 6)), output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1


def test_bad_inputs_are_refused(tiny_l2a):
    model = tiny_l2a("qwen2", window=4)
    ids = torch.randint(0, 300, (1, 6))
    with pytest.raises(ValueError, match="2-D"):
        model(ids, attention_mask=torch.ones(1, 1, 6, 6))
    with pytest.raises(ValueError, match="output_attentions"):
        model(ids, output_attentions=True)
    with pytest.raises(TypeError, match="L2ACache"):
        model(ids, **cache_kwargs(DynamicCache()), use_cache=True)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids, cu_seqlens=torch.tensor([0, 6]), attention_mask=torch.ones(1, 6))


def test_config_changes_take_effect_at_once(tiny_l2a):
    model = tiny_l2a("qwen2", window=3, random_router=False)
    ids = torch.randint(0, 300, (1, 8))
    torch.testing.assert_close(model(ids).router_fraction, torch.ones(2))
    model.config.force_route = "none"
    model.config.sliding_window = 8
    reference = tiny_l2a("qwen2", window=8, random_router=False, force_route="none")
    out = model(ids)
    torch.testing.assert_close(out.router_fraction, torch.zeros(2))
    with torch.no_grad():
        torch.testing.assert_close(out.logits, reference(ids).logits, atol=0, rtol=0)


def test_auto_loss_fuses_in_training_only(tiny_l2a):
    """HF's contract: with labels, eval mode returns logits; training mode fuses the LM head into the loss."""
    model = tiny_l2a("qwen3", window=4)
    ids = torch.randint(0, 300, (2, 10))
    model.eval()
    with torch.no_grad():
        evaluated = model(ids, labels=ids)
    assert evaluated.logits is not None and evaluated.logits.shape == (2, 10, 300)
    expected = F.cross_entropy(evaluated.logits[:, :-1].reshape(-1, 300).float(), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(evaluated.lm_loss, expected)
    model.train()
    trained = model(ids, labels=ids)
    assert trained.logits is None
    torch.testing.assert_close(trained.lm_loss, expected, rtol=1e-5, atol=1e-5)
