"""generate() with L2ACache equals decoding that recomputes the full forward at every step."""

from __future__ import annotations

import os

import pytest
import torch

import l2a.layers.attention as attention_module
import l2a.models.cache as cache_module
from l2a.models import L2ACache
from l2a.models._compat import CACHE_KWARG, cache_kwargs

PROMPT, NEW = 13, 8


def _left_padded_batch(pad: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 300, (2, PROMPT))
    mask = torch.ones_like(ids)
    ids[1, :pad] = 0
    mask[1, :pad] = 0
    return ids, mask


@torch.no_grad()
def _greedy_by_recompute(model, ids, mask, steps):
    fractions = []
    for _ in range(steps):
        out = model(ids, attention_mask=mask, use_cache=False)
        fractions.append(out.router_fraction)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids, torch.stack(fractions)


def _generate(model, ids, mask, steps, **kwargs):
    """Greedy generate() returning the dict output."""
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=steps,
        do_sample=False,
        return_dict_in_generate=True,
        **kwargs,
    )


@pytest.mark.parametrize("arch,window", [("qwen3", 4), ("qwen2", 1), ("llama", 6)])
def test_greedy_generate_with_cache_equals_recompute(arch, window, tiny_l2a):
    model = tiny_l2a(arch, window=window)
    ids, mask = _left_padded_batch()
    out = _generate(model, ids, mask, NEW, pad_token_id=0)
    expected, fractions = _greedy_by_recompute(model, ids, mask, NEW)
    assert ((fractions > 0) & (fractions < 1)).any(), "routing must be mixed for this test to mean anything"
    torch.testing.assert_close(out.sequences, expected, atol=0, rtol=0)
    cache = out.past_key_values
    assert isinstance(cache, L2ACache)
    assert cache.get_seq_length() == PROMPT + NEW - 1


def test_chunked_prefill_equals_single_forward(tiny_l2a):
    model = tiny_l2a("qwen3", window=5)
    ids, mask = _left_padded_batch(pad=3)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False)
        cache = L2ACache(model.config)
        logits = []
        for start, stop in ((0, 6), (6, 7), (7, PROMPT)):
            out = model(
                ids[:, start:stop], attention_mask=mask[:, :stop], **cache_kwargs(cache), use_cache=True
            )
            logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, dim=1)[1, 3:], full.logits[1, 3:], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(logits, dim=1)[0], full.logits[0], atol=1e-5, rtol=0)


def test_cache_memory_is_bounded_locally(tiny_l2a):
    window = 4
    model = tiny_l2a("qwen2", window=window, global_layers=[1])
    ids, mask = _left_padded_batch()
    per_token = 2 * 2 * 16 * 4  # batch 2, Hkv 2, D 16, float32 bytes
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
    # after the prefill: keys and values of the last W - 1 tokens locally, of every token globally
    local = 2 * (window - 1) * per_token
    assert cache.layer_nbytes() == [
        {"local": local, "global": 0},
        {"local": local, "global": 2 * PROMPT * per_token},
    ]
    assert cache.nbytes() == 2 * local + 2 * PROMPT * per_token
    # decoding: the local buffers stay bounded (spare slots included), whatever the number of steps
    sizes = []
    for new in (NEW, 3 * NEW):
        out = _generate(model, ids, mask, new)
        sizes.append(out.past_key_values.layer_nbytes())
    bound = 2 * (window - 1 + cache_module.LOCAL_SLACK) * per_token
    assert sizes[0][0]["local"] == sizes[1][0]["local"] <= bound
    assert sizes[0][1]["global"] >= 2 * (PROMPT + NEW - 1) * per_token


def test_layers_that_cannot_route_keep_no_global_cache(tiny_l2a):
    model = tiny_l2a("qwen3", window=3, force_route="none")
    ids, mask = _left_padded_batch()
    out = _generate(model, ids, mask, 3)
    assert [b["global"] for b in out.past_key_values.layer_nbytes()] == [0, 0]
    # switching routing back on with that cache is refused, not silently wrong
    model.config.force_route = None
    with pytest.raises(ValueError, match="no global keys"):
        model(ids[:, :1], past_key_values=out.past_key_values, use_cache=True)


@pytest.mark.parametrize("max_length", [None, PROMPT + 30], ids=["grown", "static"])
def test_long_generation_through_buffer_moves_equals_recompute(tiny_l2a, monkeypatch, max_length):
    """Small spare/growth sizes, so that local buffers slide and global buffers grow several times."""
    monkeypatch.setattr(cache_module, "LOCAL_SLACK", 3)
    monkeypatch.setattr(cache_module, "GLOBAL_CHUNK", 5)
    model = tiny_l2a("qwen3", window=5)
    ids, mask = _left_padded_batch(pad=6)
    steps = 20
    cache = L2ACache(model.config, max_length=max_length)
    out = _generate(model, ids, mask, steps, **{CACHE_KWARG: cache})
    expected, fractions = _greedy_by_recompute(model, ids, mask, steps)
    assert ((fractions > 0) & (fractions < 1)).any()
    torch.testing.assert_close(out.sequences, expected, atol=0, rtol=0)
    if max_length is not None:
        per_token = 2 * 2 * 16 * 4
        assert out.past_key_values.layer_nbytes()[0]["global"] == 2 * max_length * per_token


@pytest.mark.parametrize("variant", ["local_only", "pruned"])
def test_static_generation_without_global_caches_equals_recompute(tiny_l2a, variant):
    from l2a.models import prune_global_layers

    model = tiny_l2a("qwen2", window=4, force_route="none" if variant == "local_only" else None)
    if variant == "pruned":
        prune_global_layers(model, [0])
    ids, mask = _left_padded_batch()
    out = _generate(model, ids, mask, NEW, cache_implementation="static")
    expected, _ = _greedy_by_recompute(model, ids, mask, NEW)
    torch.testing.assert_close(out.sequences, expected, atol=0, rtol=0)
    globals_ = [b["global"] for b in out.past_key_values.layer_nbytes()]
    assert globals_[0] == 0 and (globals_[1] > 0) == (variant == "pruned")


def test_static_cache_too_short_is_refused(tiny_l2a):
    model = tiny_l2a("qwen3", window=5)
    with pytest.raises(ValueError, match="max_length=10"):
        model.generate(
            torch.randint(1, 300, (1, 8)), max_new_tokens=5, **{CACHE_KWARG: L2ACache(model.config, 10)}
        )


def test_tokens_routed_nowhere_skip_global_attention(tiny_l2a, monkeypatch):
    calls = []
    real = attention_module.conditional_attention

    def counting(q, *args, **kwargs):
        calls.append(q.shape[1])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(attention_module, "conditional_attention", counting)
    model = tiny_l2a("qwen3", window=3, force_route="none")
    ids, mask = _left_padded_batch()
    model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert calls == []
    model = tiny_l2a("qwen3", window=3, random_router=False)
    model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert calls == [PROMPT] * 2 + [1] * 6  # every token routed: prefill + 3 decode steps, 2 layers


@pytest.mark.parametrize("implementation", [None, "static"], ids=["dynamic", "static"])
def test_beam_search_with_cache_equals_without(tiny_l2a, implementation):
    model = tiny_l2a("qwen2", window=3)
    ids, mask = _left_padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    with_cache = model.generate(ids, use_cache=True, cache_implementation=implementation, **kwargs)
    without = model.generate(ids, use_cache=False, **kwargs)
    torch.testing.assert_close(with_cache, without, atol=0, rtol=0)


def test_foreign_cache_refused(tiny_l2a):
    from transformers import DynamicCache

    model = tiny_l2a("qwen2", window=3)
    with pytest.raises(TypeError, match="L2ACache"):
        model.generate(torch.randint(1, 300, (1, 5)), past_key_values=DynamicCache(), max_new_tokens=2)


def test_cache_implementation_static_sizes_the_global_cache_once(tiny_l2a):
    model = tiny_l2a("qwen2", window=3)
    ids, mask = _left_padded_batch()
    out = _generate(model, ids, mask, NEW, cache_implementation="static")
    expected, _ = _greedy_by_recompute(model, ids, mask, NEW)
    torch.testing.assert_close(out.sequences, expected, atol=0, rtol=0)
    per_token = 2 * 2 * 16 * 4  # batch 2, Hkv 2, D 16, float32 bytes
    assert out.past_key_values.max_length >= PROMPT + NEW - 1
    assert out.past_key_values.layer_nbytes()[1]["global"] == 2 * out.past_key_values.max_length * per_token


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generate_with_decode_kernels_matches_full_forward_on_gpu(tiny_l2a, monkeypatch):
    """Cached decoding through the split-key decode kernels (local and global branch) against the full
    forward of the training kernels, step by step; left padding and mixed routing."""
    from l2a.ops.triton import decode

    monkeypatch.setattr(decode, "DECODE_MIN_KEYS", 8)
    calls = []
    real = decode.decode_attention_fwd
    monkeypatch.setattr(decode, "decode_attention_fwd", lambda *a: calls.append(1) or real(*a))
    model = tiny_l2a("qwen3", window=8, base=dict(hidden_size=128, head_dim=32, num_hidden_layers=3))
    model = model.cuda().eval()
    model.config.attention_backend = "triton"
    ids = torch.randint(1, 300, (2, 40), device="cuda")
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=12,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    assert calls, "the decode kernels must have run"
    steps = torch.stack(out.logits, dim=1)
    full_mask = torch.cat([mask, torch.ones_like(out.sequences[:, 40:])], dim=1)
    with torch.no_grad():
        full = model(out.sequences, attention_mask=full_mask, use_cache=False).logits[:, 39:-1]
    torch.testing.assert_close(steps, full, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize(
    "arch,backend",
    [("qwen3", "auto"), ("qwen2", "auto")]
    + ([("qwen2", "triton")] if os.environ.get("TRITON_INTERPRET") == "1" else []),
)
def test_static_decode_step_compiles_to_one_graph_without_recompiles(tiny_l2a, arch, backend):
    """torch.compile(fullgraph=True) of the decode step with a static cache: one graph for every step (no
    break, no recompilation as the cache fills), same logits as the eager step. qwen2 (no q/k norms) takes
    the one-kernel k/v projection into the caches and the global branch's one-kernel entry; "triton": the
    kernels' custom ops in the graph (interpreter)."""
    base = dict(hidden_size=64, head_dim=32, num_hidden_layers=2) if backend == "triton" else None
    model = tiny_l2a(arch, window=4, base=base)
    model.config.attention_backend = backend
    ids, mask = _left_padded_batch()
    graphs = []

    def counting_backend(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(model, backend=counting_backend, fullgraph=True)
    caches = [L2ACache(model.config, max_length=PROMPT + 8) for _ in range(2)]
    with torch.no_grad():
        prompt = [model(ids, attention_mask=mask, use_cache=True, **{CACHE_KWARG: c}).logits for c in caches]
        tokens = [p[:, -1:].argmax(-1) for p in prompt]
        fractions = []
        for _ in range(5):
            got = step(input_ids=tokens[0], use_cache=True, **{CACHE_KWARG: caches[0]})
            ref = model(input_ids=tokens[1], use_cache=True, **{CACHE_KWARG: caches[1]})
            torch.testing.assert_close(got.logits, ref.logits, atol=1e-5, rtol=0)
            fractions.append(ref.router_fraction)
            tokens = [got.logits[:, -1:].argmax(-1), ref.logits[:, -1:].argmax(-1)]
    assert len(graphs) == 1
    if backend == "triton":  # the global branch's entry (norm, router, k/v into the cache, q) as one op
        assert "l2a.norm_route_qkv" in graphs[0].code
    assert caches[0].get_seq_length() == PROMPT + 5
