"""The model on the Triton backend under Triton's CPU interpreter (`TRITON_INTERPRET=1`, CPU tensors):
logits, routing and every gradient match the PyTorch backend. The CPU counterpart of `test_l2a_gpu.py`, so
that CI runs the model-level Triton path (layers -> ops -> autograd -> launchers -> kernels)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs the Triton kernels on CPU: needs TRITON_INTERPRET=1",
)

# head_dim 32: the smallest head size of the Triton kernels; short rows keep the interpreter fast
BASE = dict(hidden_size=64, head_dim=32, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2)


def _run(model, backend: str, **inputs):
    model.config.attention_backend = backend
    model.zero_grad()
    out = model(**inputs, router_regularizer_weight=1e-3, loss_impl="plain")  # plain: logits in training too
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.router_fraction, grads


def _assert_same(model, **inputs):
    ref_logits, ref_fraction, ref_grads = _run(model, "torch", **inputs)
    logits, fraction, grads = _run(model, "triton", **inputs)
    assert ref_fraction.min() > 0 and ref_fraction.max() < 1, "routing must be mixed"
    torch.testing.assert_close(fraction, ref_fraction)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert grads.keys() == ref_grads.keys() and any("global_attn" in n for n in grads)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
def test_triton_matches_torch_on_cpu_interpreter(tiny_l2a, arch):
    model = tiny_l2a(arch, window=8, base=BASE).train()
    ids = torch.randint(0, 300, (2, 40))
    _assert_same(model, input_ids=ids, labels=ids)


def test_triton_matches_torch_packed_documents_and_leakage(tiny_l2a):
    model = tiny_l2a("qwen3", window=8, base=BASE).train()
    ids = torch.randint(0, 300, (1, 45))
    cu_seqlens = torch.tensor([0, 17, 45], dtype=torch.int32)
    _assert_same(model, input_ids=ids, labels=ids, cu_seqlens=cu_seqlens)
    _assert_same(model, input_ids=ids, labels=ids, cu_seqlens=cu_seqlens, global_leakage=True)
