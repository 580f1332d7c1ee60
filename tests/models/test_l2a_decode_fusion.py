"""Decode steps with the global branch's k/v projections fused into one GEMM
(`L2ADecoderLayer.decode_weights`) and q/o projected on routed rows only (`l2a.ops.routed_linear`) against
the plain modules (every row projected, the output masked), and the fused copies' life cycle."""

from __future__ import annotations

import os

import pytest
import torch

from l2a.layers import L2ADecoderLayer
from l2a.models import L2ACache
from l2a.models._compat import CACHE_KWARG

PROMPT, STEPS = 11, 6


@torch.no_grad()
def _decode(model, ids, mask, max_length, steps=STEPS, tokens=None):
    """Prompt forward then `steps` single-token steps (fed `tokens` (B, steps), or greedy); returns the
    step logits (B, steps, V) and hard decisions (steps, layers, B)."""
    cache = L2ACache(model.config, max_length=max_length)
    out = model(ids, attention_mask=mask, use_cache=True, **{CACHE_KWARG: cache})
    token = out.logits[:, -1:].argmax(-1)
    logits, hard = [], []
    decisions = []
    # on the decoder layers (a hook on the norm, router or branch would turn the one-kernel entry off)
    hooks = [
        layer.register_forward_hook(lambda _m, _a, out, d=decisions: d.append(out[2]))
        for layer in model.model.layers
        if layer.has_global
    ]
    for i in range(steps):
        if tokens is not None:
            token = tokens[:, i : i + 1]
        decisions.clear()
        out = model(token, use_cache=True, **{CACHE_KWARG: cache})
        logits.append(out.logits[:, -1])
        hard.append(torch.stack([d.squeeze(1) for d in decisions] or [token.new_zeros(0, dtype=torch.bool)]))
        token = out.logits[:, -1:].argmax(-1)
    for h in hooks:
        h.remove()
    return torch.stack(logits, 1), torch.stack(hard)


def _batch(pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 300, (2, PROMPT))
    mask = torch.ones_like(ids)
    ids[1, :pad], mask[1, :pad] = 0, 0
    return ids, mask


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])  # q/k/v biases; per-head q/k norms
def test_fused_decode_steps_equal_the_unfused_modules(tiny_l2a, monkeypatch, arch, static):
    model = tiny_l2a(arch, window=4)
    ids, mask = _batch()
    tokens = torch.randint(1, 300, (2, STEPS))
    max_length = PROMPT + STEPS if static else None
    calls = []
    real = L2ADecoderLayer.decode_weights
    monkeypatch.setattr(
        L2ADecoderLayer, "decode_weights", lambda self, branch="global": calls.append(1) or real(self, branch)
    )
    fused, fused_hard = _decode(model, ids, mask, max_length, tokens=tokens)
    assert calls, "the fused decode path must have run"
    monkeypatch.setattr(L2ADecoderLayer, "FUSE_DECODE", False)
    calls.clear()
    plain, plain_hard = _decode(model, ids, mask, max_length, tokens=tokens)
    assert not calls
    assert fused_hard.any() and not fused_hard.all(), "routing must be mixed for this test to mean anything"
    assert torch.equal(fused_hard, plain_hard)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


def test_fused_decode_in_bfloat16_within_its_tolerance(tiny_l2a, monkeypatch):
    model = tiny_l2a("qwen2", window=4).to(torch.bfloat16)
    ids, mask = _batch()
    tokens = torch.randint(1, 300, (2, STEPS))
    fused, fused_hard = _decode(model, ids, mask, PROMPT + STEPS, tokens=tokens)
    monkeypatch.setattr(L2ADecoderLayer, "FUSE_DECODE", False)
    plain, plain_hard = _decode(model, ids, mask, PROMPT + STEPS, tokens=tokens)
    assert (fused_hard == plain_hard).float().mean() >= 0.9  # a decision on the threshold may flip
    same = (fused_hard == plain_hard).all(0).all(0)  # rows whose every decision agrees
    assert same.any()
    torch.testing.assert_close(fused[same].float(), plain[same].float(), atol=3e-2, rtol=2e-2)


def test_fused_decode_under_autocast_matches_the_unfused_modules(tiny_l2a, monkeypatch):
    """Under bf16 autocast (h float32, weights float32, GEMMs in bf16) the static steps take the GEMM paths,
    not the one-kernel k/v projection (whose dtypes must agree), and match the plain modules."""
    model = tiny_l2a("qwen2", window=4)
    ids, mask = _batch()
    tokens = torch.randint(1, 300, (2, STEPS))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, fused_hard = _decode(model, ids, mask, PROMPT + STEPS, tokens=tokens)
        monkeypatch.setattr(L2ADecoderLayer, "FUSE_DECODE", False)
        plain, plain_hard = _decode(model, ids, mask, PROMPT + STEPS, tokens=tokens)
    same = (fused_hard == plain_hard).all(0).all(0)
    assert same.any()
    torch.testing.assert_close(fused[same].float(), plain[same].float(), atol=3e-2, rtol=2e-2)


def test_fused_weights_follow_parameter_changes_and_training(tiny_l2a, monkeypatch):
    model = tiny_l2a("qwen2", window=4)
    ids, mask = _batch()
    tokens = torch.randint(1, 300, (2, STEPS))
    _decode(model, ids, mask, PROMPT + STEPS, tokens=tokens)
    layer = model.model.layers[0]
    first = layer._decode_weights[1]
    attn = layer.global_attn
    rows = 2 * attn.num_kv_heads * attn.head_dim
    assert first.shape[0] % L2ADecoderLayer.DECODE_ROWS_MULTIPLE == 0 and not first[rows:].any()
    with torch.no_grad():  # in place: the version counter changes, the storage does not
        layer.global_attn.k_proj.weight.mul_(1.5)
        layer.router.weight.neg_()
    fused, _ = _decode(model, ids, mask, PROMPT + STEPS, tokens=tokens)
    assert layer._decode_weights[1] is not first
    monkeypatch.setattr(L2ADecoderLayer, "FUSE_DECODE", False)
    plain, _ = _decode(model, ids, mask, PROMPT + STEPS, tokens=tokens)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    model.train()
    model(ids, attention_mask=mask, use_cache=False)
    assert all(
        layer._decode_weights is None and layer._local_decode_weights is None for layer in model.model.layers
    )


def test_no_fused_weights_without_a_cache_or_with_gradients(tiny_l2a):
    model = tiny_l2a("qwen3", window=4)
    ids, mask = _batch()
    with torch.no_grad():
        model(ids, attention_mask=mask, use_cache=False)
    model(ids, attention_mask=mask, use_cache=True)
    assert all(layer._decode_weights is None for layer in model.model.layers)


def test_local_only_decoding_makes_no_fused_weights(tiny_l2a):
    """force_route="none" with a cache that keeps no global K/V skips the global branch, GEMM included."""
    model = tiny_l2a("qwen3", window=4, force_route="none")
    ids, mask = _batch()
    _decode(model, ids, mask, PROMPT + STEPS)
    assert all(layer._decode_weights is None for layer in model.model.layers)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1",
)
@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_routed_rows_kernel_in_decode_steps_equals_the_plain_modules(tiny_l2a, monkeypatch, static):
    """With the Triton backend the decode steps' q/o projections run the routed-rows kernel (steps with and
    without routed rows), and the logits equal the plain modules' (every row projected)."""
    pytest.importorskip("triton")
    from l2a.ops.triton import routed_linear

    device = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    model = tiny_l2a("qwen2", window=4, base=dict(hidden_size=64, head_dim=32, num_hidden_layers=2)).to(
        device
    )
    model.config.attention_backend = "triton"
    ids, mask = (t.to(device) for t in _batch())
    tokens = torch.randint(1, 300, (2, STEPS), device=device)
    rows_routed = []
    real = routed_linear.routed_linear_fwd
    monkeypatch.setattr(
        routed_linear,
        "routed_linear_fwd",
        lambda x, w, b, a, *r: rows_routed.append(int(a.sum())) or real(x, w, b, a, *r),
    )
    max_length = PROMPT + STEPS if static else None
    fused, fused_hard = _decode(model, ids, mask, max_length, tokens=tokens)
    assert 0 in rows_routed and max(rows_routed) > 0, "steps with and without routed rows must both occur"
    monkeypatch.setattr(L2ADecoderLayer, "FUSE_DECODE", False)
    rows_routed.clear()
    plain, plain_hard = _decode(model, ids, mask, max_length, tokens=tokens)
    assert not rows_routed
    assert torch.equal(fused_hard, plain_hard)
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1",
)
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_static_decode_steps_with_triton_kernels_equal_the_pytorch_path(tiny_l2a, arch, monkeypatch):
    """Static steps through the Triton kernels (global k/v projected, rotated and written into the cache
    in one kernel and q rotated inside its routed-rows projection where the model has no q/k norms; else k
    rotated inside the cache write; routed-rows q/o with the residual added in the kernel, decode
    attention) against the PyTorch path (RoPE formula, index_copy_, masked float attention, plain
    modules), from the same prompt cache contents."""
    pytest.importorskip("triton")
    from l2a.ops.triton import rmsnorm, routed_linear

    device = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    model = tiny_l2a(arch, window=4, base=dict(hidden_size=64, head_dim=32, num_hidden_layers=2)).to(device)
    ids, mask = (t.to(device) for t in _batch())
    tokens = torch.randint(1, 300, (2, STEPS), device=device)
    launches = {"kv": 0, "rotary_q": 0, "norm_logits": 0, "entry": 0}
    real_kv, real_rows = routed_linear.linear_kv_cache_fwd, routed_linear.routed_linear_fwd
    real_norm, real_entry = rmsnorm.rms_norm_logits_fwd, routed_linear.norm_route_qkv_fwd

    def count_entry(*args):
        launches["entry"] += 1
        return real_entry(*args)

    def count_norm(*args):
        launches["norm_logits"] += 1
        return real_norm(*args)

    def count_kv(*args):
        launches["kv"] += 1
        return real_kv(*args)

    def count_rows(*args):
        launches["rotary_q"] += args[5] is not None  # cos
        return real_rows(*args)

    monkeypatch.setattr(routed_linear, "linear_kv_cache_fwd", count_kv)
    monkeypatch.setattr(routed_linear, "routed_linear_fwd", count_rows)
    monkeypatch.setattr(rmsnorm, "rms_norm_logits_fwd", count_norm)
    monkeypatch.setattr(routed_linear, "norm_route_qkv_fwd", count_entry)
    results = {}
    for backend in ("triton", "torch"):
        model.config.attention_backend = backend
        results[backend] = _decode(model, ids, mask, PROMPT + STEPS, tokens=tokens)
    # qwen2: every static step of both layers runs the global branch's entry kernel (norm, router, k/v into
    # the cache, routed q) and the local k/v kernel; the prompt (<= 16 tokens take the decode path, not
    # static) the norm with the router's logits and the routed q. qwen3 (q/k norms): norm + logits only.
    if arch == "qwen2":
        want = dict(kv=STEPS * 2, rotary_q=2, norm_logits=2, entry=STEPS * 2)
    else:
        want = dict(kv=0, rotary_q=0, norm_logits=(STEPS + 1) * 2, entry=0)
    assert launches == want
    (got, got_hard), (want, want_hard) = results["triton"], results["torch"]
    assert want_hard.any() and not want_hard.all()
    assert torch.equal(got_hard, want_hard)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("hook", ["forward-hook", "accelerate-hook"])
def test_hooks_on_the_router_turn_the_one_kernel_entry_off(tiny_l2a, monkeypatch, hook):
    """Static steps run the global branch's entry as one op (`norm_route_qkv`) unless something observes or
    moves the router's weights: a forward hook then still fires every step, and accelerate's `_hf_hook`
    (offloading) keeps the module call; the logits stay those of the one-op entry."""
    import l2a.layers.attention as attention

    model = tiny_l2a("qwen2", window=4)
    ids, mask = _batch()
    tokens = torch.randint(1, 300, (2, STEPS))
    entries = []
    real = attention.norm_route_qkv
    monkeypatch.setattr(attention, "norm_route_qkv", lambda *a, **k: entries.append(1) or real(*a, **k))
    fused, _ = _decode(model, ids, mask, PROMPT + STEPS, tokens=tokens)
    layers = [layer for layer in model.model.layers if layer.has_global]
    assert len(entries) == STEPS * len(layers)
    entries.clear()
    calls = []
    for layer in layers:
        if hook == "forward-hook":
            layer.router.register_forward_hook(lambda *_: calls.append(1))
        else:
            layer.router._hf_hook = object()
    hooked, _ = _decode(model, ids, mask, PROMPT + STEPS, tokens=tokens)
    assert not entries
    if hook == "forward-hook":  # the prompt and every step
        assert len(calls) == (STEPS + 1) * len(layers)
    torch.testing.assert_close(hooked, fused, atol=1e-5, rtol=1e-5)
