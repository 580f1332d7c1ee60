"""bf16 autocast (the trainer's GPU default) runs the L2A model and stays close to fp32."""

import torch
import transformers

import l2a


def test_bf16_autocast_forward_backward_close_to_fp32():
    cfg = transformers.Qwen3Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    model = l2a.convert_model(transformers.Qwen3ForCausalLM(cfg), sliding_window=8).train()
    x = torch.randint(0, 300, (1, 40))
    ref = model(input_ids=x, labels=x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=x, labels=x, global_leakage=True)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert abs(out.loss.item() - ref.loss.item()) < 0.05
    for layer in model.model.layers:
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
