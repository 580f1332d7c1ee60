"""Compatibility smoke of the whole model path, run on every supported transformers release
(`make test` on the newest, `make test-compat` on the oldest): convert -> forward -> cached generate equals
full recomputation -> one training step -> save / load."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import l2a
from l2a.models import L2ACache
from l2a.models._compat import enable_activation_checkpointing, output_cache


def _greedy_by_recompute(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding that reruns the whole sequence without a cache at every step."""
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_convert_forward_generate_train_save_load(arch, make_base, randomize_routers, tmp_path):
    print(f"transformers {transformers.__version__}")
    base = make_base(arch)
    ids = torch.randint(1, 300, (2, 12))

    # convert: with the window covering the sequence and global attention off, the base model's logits
    model = l2a.convert_model(base, sliding_window=16, force_route="none").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-5, rtol=0)

    # forward with learned routing and a small window; cached generate equals recomputation
    model = l2a.convert_model(base, sliding_window=4).eval()
    randomize_routers(model)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    assert isinstance(output_cache(out), L2ACache) and output_cache(out).get_seq_length() == 12
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(generated, _greedy_by_recompute(model, ids, 5), atol=0, rtol=0)

    # one training step (activation checkpointing, leakage, regulariser) lowers the loss of the batch
    model.train()
    enable_activation_checkpointing(model, use_reentrant=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(ids, labels=ids, global_leakage=True, router_regularizer_weight=0.01).loss
    loss.backward()
    router_grad = model.model.layers[0].router.weight.grad
    assert router_grad is not None and router_grad.abs().sum() > 0
    optimizer.step()
    with torch.no_grad():
        after = model(ids, labels=ids, global_leakage=True, router_regularizer_weight=0.01).loss
    assert after < loss

    # save / load: the same logits
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, l2a.L2AForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
