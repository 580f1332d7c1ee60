"""On CUDA: the model on the Triton backend matches the PyTorch backend (forward, backward, generate)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# head_dim 32: the smallest head size of the Triton kernels
GPU_BASE = dict(hidden_size=128, head_dim=32, num_hidden_layers=3)


def _run(model, ids, backend):
    model.config.attention_backend = backend
    model.zero_grad()
    out = model(ids, labels=ids, router_regularizer_weight=1e-3, loss_impl="plain")
    out.loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.float().detach(), out.router_fraction, grads


def test_triton_matches_torch_fp32_learned_routing(tiny_l2a):
    model = tiny_l2a("qwen3", window=16, base=GPU_BASE).cuda().train()
    ids = torch.randint(0, 300, (2, 200), device="cuda")
    ref_logits, ref_fraction, ref_grads = _run(model, ids, "torch")
    logits, fraction, grads = _run(model, ids, "triton")
    assert ref_fraction.min() > 0 and ref_fraction.max() < 1, "routing must be mixed"
    torch.testing.assert_close(fraction, ref_fraction)
    torch.testing.assert_close(logits, ref_logits, atol=2e-3, rtol=2e-3)
    for name, grad in ref_grads.items():
        err = (grads[name] - grad).abs().max() / grad.abs().max().clamp_min(1e-6)
        assert err < 1e-2, (name, err)


def test_triton_bf16_error_within_twice_torch_bf16_error(tiny_l2a):
    """flash-attn's rule against an fp32 reference; routing forced on, as bf16 noise flips near-threshold
    decisions (tau = 0.1) differently per backend."""
    model = tiny_l2a("qwen3", window=16, base=GPU_BASE, force_route="all").cuda().train()
    ids = torch.randint(0, 300, (2, 200), device="cuda")
    ref_logits, _, ref_grads = _run(model, ids, "torch")
    model.to(torch.bfloat16)
    torch_logits, _, torch_grads = _run(model, ids, "torch")
    triton_logits, _, triton_grads = _run(model, ids, "triton")
    torch_err = (torch_logits - ref_logits).abs().max()
    assert (triton_logits - ref_logits).abs().max() <= 2 * torch_err + 1e-3
    for name, grad in ref_grads.items():
        torch_gerr = (torch_grads[name] - grad).abs().max()
        assert (triton_grads[name] - grad).abs().max() <= 3 * torch_gerr + 1e-4, name


def test_packed_documents_on_triton(tiny_l2a):
    model = tiny_l2a("qwen2", window=8, base=GPU_BASE).cuda().eval()
    model.config.attention_backend = "triton"
    docs = [torch.randint(0, 300, (1, n), device="cuda") for n in (70, 130)]
    cu_seqlens = torch.tensor([0, 70, 200], device="cuda")
    with torch.no_grad():
        packed = model(torch.cat(docs, 1), cu_seqlens=cu_seqlens).logits
        separate = torch.cat([model(d).logits for d in docs], 1)
    torch.testing.assert_close(packed, separate, atol=2e-3, rtol=2e-3)


def test_generate_on_triton_matches_full_forward(tiny_l2a):
    model = tiny_l2a("qwen3", window=8, base=GPU_BASE).cuda().eval()
    model.config.attention_backend = "triton"
    ids = torch.randint(1, 300, (2, 40), device="cuda")
    mask = torch.ones_like(ids)
    ids[1, :5] = 0
    mask[1, :5] = 0
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )
    steps = torch.stack(out.logits, dim=1)  # (B, new, vocab)
    full_mask = torch.cat([mask, torch.ones_like(out.sequences[:, 40:])], dim=1)
    with torch.no_grad():
        full = model(out.sequences, attention_mask=full_mask, use_cache=False).logits[:, 39:-1]
    torch.testing.assert_close(steps[0], full[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(steps[1], full[1], atol=2e-3, rtol=2e-3)
