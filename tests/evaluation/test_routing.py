"""Routing analysis: per-token decisions read by hooks agree with the model's own `router_fraction`,
needle/haystack accounting by hand, forced and pruned models, and bare-logit routers."""

from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from l2a.data.tasks import TaskSample
from l2a.data.tokenization import byte_tokenizer
from l2a.evaluation.routing import needle_mask, routing_analysis, routing_decisions


def _l2a(force_route=None, layers=3):
    from l2a.models import convert_model

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
    )
    model = convert_model(Qwen3ForCausalLM(config), sliding_window=16, force_route=force_route).eval()
    for name, param in model.named_parameters():
        if name.endswith("router.weight"):
            param.data.normal_(0, 0.3)  # a trained-looking router: some tokens routed, some not
    return model


def _sample(ids, spans, task="niah_single_1"):
    return TaskSample(task, ids, ["x"], [1], "all", 0.5, spans, 4)


def test_hook_decisions_match_router_fraction():
    model = _l2a()
    ids = torch.randint(0, 256, (2, 60))
    layers, decisions = routing_decisions(model, ids)
    assert layers == [0, 1, 2] and decisions.shape == (2, 3, 60) and decisions.dtype == torch.bool
    with torch.no_grad():
        fraction = model(input_ids=ids).router_fraction
    torch.testing.assert_close(decisions.float().mean(dim=(0, 2)), fraction.float())
    assert 0.05 < fraction.mean() < 0.95  # the test is not trivially all-or-nothing


@pytest.mark.parametrize(("force_route", "expected"), [("all", True), ("none", False)])
def test_forced_routing_is_reported(force_route, expected):
    _, decisions = routing_decisions(_l2a(force_route), torch.randint(0, 256, (1, 20)))
    assert bool((decisions == expected).all())


def test_bare_logit_routers_use_temperature_and_threshold():
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router = torch.nn.Identity()  # logit = the input itself

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Layer(), Layer()])
            self.config = SimpleNamespace(router_temperature=0.5, router_threshold=0.7)

        def forward(self, input_ids, **kwargs):
            for i, layer in enumerate(self.layers):
                layer.router(input_ids.float()[..., None] - 2.0 * i)

    # sigmoid(x / 0.5) >= 0.7  <=>  x >= 0.5 * logit(0.7) = 0.4236
    _, decisions = routing_decisions(Model(), torch.tensor([[0, 1, 2, 3]]))
    assert decisions[0].tolist() == [[False, True, True, True], [False, False, False, True]]
    # with a logit offset of 1: x + 1 >= 0.4236
    model = Model()
    model.config.router_logit_offset = 1.0
    _, decisions = routing_decisions(model, torch.tensor([[0, 1, 2, 3]]))
    assert decisions[0].tolist() == [[True, True, True, True], [False, False, True, True]]


def test_routing_analysis_accounting_by_hand():
    model = _l2a()
    tokenizer = byte_tokenizer()
    gen = torch.Generator().manual_seed(1)
    samples = [
        _sample(torch.randint(0, 256, (50,), generator=gen).tolist(), []),
        _sample(torch.randint(0, 256, (70,), generator=gen).tolist(), [(5, 9), (40, 52)]),
        _sample(torch.randint(0, 256, (40,), generator=gen).tolist(), [(0, 3)], task="vt"),
    ]
    texts = ["def f(x):\n    return x + 1\n" * 4, "plain text " * 10]
    report = routing_analysis(model, tokenizer, samples, texts=texts, text_len=64)

    routed = torch.zeros(3)
    needle = torch.zeros(3)
    for s in samples:
        d = routing_decisions(model, torch.tensor([s.input_ids]))[1][0].float()
        routed += d.sum(1)
        needle += d[:, needle_mask(len(s.input_ids), s.needle_spans)].sum(1)
    assert report.layers == [0, 1, 2]
    assert report.num_task_tokens == 160 and report.num_needle_tokens == 4 + 12 + 3
    torch.testing.assert_close(torch.tensor(report.task_fraction, dtype=torch.float64), routed.double() / 160)
    torch.testing.assert_close(
        torch.tensor(report.needle_fraction, dtype=torch.float64), needle.double() / 19
    )
    torch.testing.assert_close(
        torch.tensor(report.haystack_fraction, dtype=torch.float64), (routed - needle).double() / 141
    )
    assert set(report.per_task) == {"niah_single_1", "vt"}
    assert report.num_text_tokens == 64 + 64
    assert report.example.needle_spans == [(5, 9), (40, 52)] and report.example.decisions.shape == (3, 70)
    assert report.mean_sparsity == pytest.approx(1 - sum(report.task_fraction) / 3)


def test_routing_analysis_skips_pruned_layers():
    from l2a.models import prune_global_layers

    model = _l2a()
    prune_global_layers(model, [1])
    report = routing_analysis(model, byte_tokenizer(), texts=["some text to route " * 5])
    assert report.layers == [0, 2] and len(report.text_fraction) == 2
    assert report.task_fraction is None and report.example is None


def test_routing_analysis_rejects_non_l2a_models():
    config = Qwen3Config(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    with pytest.raises(ValueError, match="L2A model"):
        routing_analysis(Qwen3ForCausalLM(config), byte_tokenizer(), texts=["abc"])
    with pytest.raises(ValueError, match="span"):
        needle_mask(10, [(8, 12)])
