"""AHA generate(): the cached decode equals full recomputation; pruned layers keep a bounded cache."""

from __future__ import annotations

import pytest
import torch

import l2a
import l2a.ops
from l2a.models import AHACache, prune_global_layers, prune_routed_heads

PROMPT, NEW = 13, 8


def _tiny_aha(make_base, arch="qwen3", window=4, std=0.3, seed=0, **kwargs):
    model = l2a.convert_model(make_base(arch), sliding_window=window, method="aha", **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.has_global:
                layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=gen) * std)
    return model.eval()


def _left_padded_batch(pad: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 300, (2, PROMPT))
    mask = torch.ones_like(ids)
    ids[1, :pad] = 0
    mask[1, :pad] = 0
    return ids, mask


@torch.no_grad()
def _greedy_by_recompute(model, ids, mask, steps):
    heads = []
    for _ in range(steps):
        out = model(ids, attention_mask=mask, use_cache=False)
        heads.append(out.router_head_fraction)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids, torch.stack(heads)


def _generate(model, ids, mask, new=NEW, **kwargs):
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        return_dict_in_generate=True,
        pad_token_id=0,
        **kwargs,
    )


@pytest.mark.parametrize("arch,window", [("qwen3", 4), ("qwen2", 1), ("llama", 6)])
def test_greedy_generate_with_cache_equals_recompute(arch, window, make_base):
    model = _tiny_aha(make_base, arch, window)
    ids, mask = _left_padded_batch()
    out = _generate(model, ids, mask)
    expected, heads = _greedy_by_recompute(model, ids, mask, NEW)
    assert ((heads > 0) & (heads < 1)).any(), "routing must be mixed for this test to mean anything"
    torch.testing.assert_close(out.sequences, expected, atol=0, rtol=0)
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    assert isinstance(cache, AHACache)
    assert cache.get_seq_length() == PROMPT + NEW - 1


def test_chunked_prefill_equals_single_forward(make_base):
    model = _tiny_aha(make_base, "qwen3", window=5)
    ids, mask = _left_padded_batch(pad=3)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False)
        cache = AHACache(model.config)
        logits = []
        for start, stop in ((0, 6), (6, 7), (7, PROMPT)):
            out = model(
                ids[:, start:stop], attention_mask=mask[:, :stop], past_key_values=cache, use_cache=True
            )
            logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, dim=1)[1, 3:], full.logits[1, 3:], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(logits, dim=1)[0], full.logits[0], atol=1e-5, rtol=0)


def test_local_decode_steps_skip_the_far_part(make_base, monkeypatch):
    """With a cache, a step where no head routes runs window attention over the last keys only."""
    calls = {"aha": [], "window": []}
    real_aha, real_window = l2a.ops.all_or_here_attention, l2a.ops.sliding_window_attention

    def counting_aha(q, k, *args, **kwargs):
        calls["aha"].append(k.shape[1])
        return real_aha(q, k, *args, **kwargs)

    def counting_window(q, k, *args, **kwargs):
        calls["window"].append(k.shape[1])
        return real_window(q, k, *args, **kwargs)

    monkeypatch.setattr(l2a.ops, "all_or_here_attention", counting_aha)
    monkeypatch.setattr(l2a.ops, "sliding_window_attention", counting_window)
    model = _tiny_aha(make_base, "qwen3", window=3, force_route="none")
    ids, mask = _left_padded_batch()
    model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert calls["aha"] == []
    assert calls["window"] == [PROMPT] * 2 + [3] * 6  # decode reads W keys, not the whole prefix


def _never_route(model, layer, heads):
    """A forward hook that keeps `heads` of `layer` local (what a trained router that never fires does)."""

    def hook(module, args, output):
        for t in (output.hard, output.gate, output.soft):
            t[..., heads] = 0

    return model.model.layers[layer].router.register_forward_hook(hook)


def test_pruned_layer_has_bounded_cache_and_same_output(make_base):
    window = 4
    model = _tiny_aha(make_base, "qwen2", window=window)
    handle = _never_route(model, 0, list(range(4)))
    ids, mask = _left_padded_batch()
    before = _generate(model, ids, mask)
    handle.remove()
    assert prune_global_layers(model, [0]) == [0]
    assert model.config.routed_heads[0] == [] and model.config.global_layers == [1]
    after = _generate(model, ids, mask)
    torch.testing.assert_close(after.sequences, before.sequences, atol=0, rtol=0)
    longer = _generate(model, ids, mask, new=3 * NEW)

    def sizes(out):
        cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
        return cache.layer_nbytes()

    short, long = sizes(after), sizes(longer)
    per_token = 2 * 2 * 16 * 4  # batch 2, Hkv 2, D 16, float32 bytes
    # the window-only layer holds at most the window and does not grow; the routed layer holds every token
    assert short[0]["global"] == long[0]["global"] == 0
    assert 0 < long[0]["local"] == short[0]["local"]  # (its buffer policy may keep some slack)
    assert short[1]["local"] == long[1]["local"] == 0
    assert long[1]["global"] >= 2 * (PROMPT + 3 * NEW - 1) * per_token


def test_head_pruning_keeps_outputs_and_saves(make_base, tmp_path):
    model = _tiny_aha(make_base, "llama", window=3)
    handle = _never_route(model, 1, [0, 2])
    ids = torch.randint(1, 300, (2, 16))
    with torch.no_grad():
        out = model(ids)
    handle.remove()
    fractions = out.router_head_fraction
    assert fractions[1, 0] == 0 and fractions[1, 2] == 0 and (fractions[:, [1, 3]] > 0).all()
    pruned = prune_routed_heads(model, threshold=0.01, fractions=fractions)
    assert pruned == {1: [0, 2]}
    assert model.config.routed_heads == [[0, 1, 2, 3], [1, 3]]
    assert model.model.layers[1].router.weight.shape == (2, 64)
    with torch.no_grad():
        again = model(ids)
    torch.testing.assert_close(again.logits, out.logits, atol=0, rtol=0)
    torch.testing.assert_close(again.router_head_fraction, fractions)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, out.logits, atol=0, rtol=0)
    # pruning every routed head of a layer leaves a window-only layer
    assert prune_routed_heads(model, {1: [1, 3]}) == {1: [1, 3]}
    assert model.config.global_layers == [0] and not model.model.layers[1].has_global


def test_l2a_cache_refused_by_aha_model(make_base):
    model = _tiny_aha(make_base)
    with pytest.raises(TypeError, match="AHACache"):
        model(torch.randint(1, 300, (1, 5)), past_key_values=l2a.models.L2ACache(model.config))


def test_static_cache_refused_by_aha_model(make_base):
    model = _tiny_aha(make_base)
    ids, mask = _left_padded_batch()
    with pytest.raises(ValueError, match="dynamic AHACache"):
        model.generate(
            ids, attention_mask=mask, max_new_tokens=2, cache_implementation="static", pad_token_id=0
        )
