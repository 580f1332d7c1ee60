"""`linear_cross_entropy` ("chunked") against HF's causal-LM loss on materialised logits: loss and every
gradient, fp32 and bf16, with ignored targets, uneven chunks and HF's `num_items_in_batch`."""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from l2a.ops.linear_cross_entropy import linear_cross_entropy, resolve_loss_impl, shift_labels

V, H = 97, 24


def _inputs(dtype, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 19, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (2, 19), generator=g)
    labels[0, :5] = -100
    labels[1, 11] = -100
    return hidden, weight, b, labels


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("num_items", [None, 40], ids=["mean", "num_items"])
@pytest.mark.parametrize("chunk", [5, 4096], ids=["chunk5", "one-chunk"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_equals_hf_loss_on_logits(dtype, bias, chunk, num_items):
    hidden, weight, b, labels = _inputs(dtype, bias)
    logits = torch.nn.functional.linear(hidden, weight, b)
    ref = ForCausalLMLoss(logits, labels, V, num_items_in_batch=num_items)
    ref_grads = _grads(ref, (hidden, weight, b))
    out = linear_cross_entropy(
        hidden, weight, shift_labels(labels), bias=b, num_items_in_batch=num_items, chunk_tokens=chunk
    )
    grads = _grads(out, (hidden, weight, b))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(out, ref.float(), **tol)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **tol)


def test_bf16_error_within_twice_the_plain_bf16_error():
    """Against a float64 reference, the chunked bf16 gradients are as accurate as the plain bf16 path's."""
    hidden, weight, _, labels = _inputs(torch.bfloat16, False, seed=3)
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    ref = ForCausalLMLoss(h64 @ w64.T, labels, V)
    ref_grads = _grads(ref, (h64, w64))
    plain = _grads(ForCausalLMLoss(hidden @ weight.T, labels, V), (hidden, weight))
    chunked = _grads(
        linear_cross_entropy(hidden, weight, shift_labels(labels), chunk_tokens=7), (hidden, weight)
    )
    for p, c, r in zip(plain, chunked, ref_grads, strict=True):
        assert (c.double() - r).abs().max() <= 2 * (p.double() - r).abs().max() + 1e-6


def test_autocast_matches_autocast_linear():
    hidden, weight, _, labels = _inputs(torch.float32, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = ForCausalLMLoss(torch.nn.functional.linear(hidden, weight), labels, V)
        out = linear_cross_entropy(hidden, weight, shift_labels(labels), chunk_tokens=8)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-6)
    for got, want in zip(_grads(out, (hidden, weight)), _grads(ref, (hidden, weight)), strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


def test_all_targets_ignored_is_nan_like_hf():
    hidden, weight, _, labels = _inputs(torch.float32, False)
    labels[:] = -100
    assert torch.isnan(linear_cross_entropy(hidden, weight, shift_labels(labels)))
    assert torch.isnan(ForCausalLMLoss(hidden @ weight.T, labels, V))


def test_resolve_loss_impl(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_loss_impl("auto", cpu) == "chunked"
    assert resolve_loss_impl("plain", cpu) == "plain"
    monkeypatch.setattr("l2a.ops.linear_cross_entropy.liger_available", lambda: True)
    assert resolve_loss_impl("auto", cpu) == "chunked"
    assert resolve_loss_impl("auto", torch.device("cuda")) == "liger"
    with pytest.raises(ValueError, match="CUDA only"):
        resolve_loss_impl("liger", cpu)
    with pytest.raises(ValueError, match="loss_impl must be one of"):
        resolve_loss_impl("fused", cpu)
    monkeypatch.setattr("l2a.ops.linear_cross_entropy.liger_available", lambda: False)
    with pytest.raises(ImportError, match=r"l2a\[liger\]"):
        resolve_loss_impl("liger", torch.device("cuda"))
    assert resolve_loss_impl("auto", torch.device("cuda")) == "chunked"


def test_shape_mismatch_is_an_error():
    hidden, weight, _, labels = _inputs(torch.float32, False)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, labels[:, 1:])
