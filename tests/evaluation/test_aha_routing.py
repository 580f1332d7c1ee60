"""Routing analysis of AHA models: per-(layer, head) decisions agree with the model's own statistics, the
heat map is written, and `run_evaluation` runs the learned / local_only / all_global variants."""

import json

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from l2a.data.tasks import TaskSample
from l2a.data.tokenization import byte_tokenizer
from l2a.evaluation.report import ModelEvaluation, write_report
from l2a.evaluation.routing import routing_analysis, routing_decisions


def _aha(force_route=None):
    from l2a.models import convert_model

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
    )
    model = convert_model(Qwen3ForCausalLM(config), sliding_window=8, method="aha", force_route=force_route)
    for name, param in model.named_parameters():
        if name.endswith("router.weight"):
            param.data.normal_(0, 0.3)
    return model.eval()


def test_head_decisions_match_the_model_statistics():
    model = _aha()
    ids = torch.randint(0, 256, (2, 40))
    layers, decisions = routing_decisions(model, ids)
    assert layers == [0, 1, 2] and decisions.shape == (2, 3, 40, 4) and decisions.dtype == torch.bool
    with torch.no_grad():
        out = model(input_ids=ids)
    torch.testing.assert_close(decisions.float().mean(dim=(0, 2)), out.router_head_fraction.float())
    torch.testing.assert_close(decisions.float().mean(dim=(0, 2, 3)), out.router_fraction.float())
    assert 0.05 < out.router_fraction.mean() < 0.95


def test_analysis_per_head_by_hand_and_heat_map(tmp_path):
    model = _aha()
    tokenizer = byte_tokenizer()
    ids = torch.randint(0, 256, (30,)).tolist()
    sample = TaskSample("niah_single_1", ids, ["x"], [1], "all", 0.5, [(5, 9)], 4)
    text = "def f(x):\n    return x + 1\n" * 3
    report = routing_analysis(model, tokenizer, [sample], texts=[text], text_len=25)
    _, task = routing_decisions(model, torch.tensor([ids]))
    _, txt = routing_decisions(
        model, torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:25]])
    )
    task, txt = task[0].double(), txt[0].double()  # (L, N, H)
    expected_heads = (task.sum(1) + txt.sum(1)) / (30 + 25)
    torch.testing.assert_close(torch.tensor(report.head_fraction, dtype=torch.float64), expected_heads)
    torch.testing.assert_close(torch.tensor(report.task_fraction, dtype=torch.float64), task.mean((1, 2)))
    torch.testing.assert_close(
        torch.tensor(report.needle_fraction, dtype=torch.float64), task[:, 5:9].mean((1, 2))
    )
    torch.testing.assert_close(torch.tensor(report.text_fraction, dtype=torch.float64), txt.mean((1, 2)))
    assert report.example.decisions.shape == (3, 30)
    written = write_report([ModelEvaluation(label="aha", info={}, routing=report)], tmp_path)
    png = written["head_routing:aha"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Per head (aha" in (tmp_path / "results.md").read_text()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["models"][0]["routing"]["head_fraction"] == report.head_fraction


def test_run_evaluation_variants_of_an_aha_checkpoint(tmp_path):
    from l2a.evaluation.runner import EvalSettings, run_evaluation

    model = _aha()
    model.save_pretrained(tmp_path / "aha")
    byte_tokenizer().save_pretrained(tmp_path / "aha")
    settings = EvalSettings(tasks=["kv_retrieval"], lengths=[256], samples=1, routing_texts=1, progress=False)
    results = run_evaluation(
        [tmp_path / "aha"],
        settings,
        out_dir=tmp_path / "eval",
        variants=["learned", "local_only", "all_global"],
    )
    assert [r.label for r in results] == ["aha [learned]", "aha [local_only]", "aha [all_global]"]
    assert results[0].info["method"] == "aha" and results[0].routing.head_fraction is not None
    assert results[1].routing is None and results[1].info["force_route"] == "none"
    assert [p.name for p in (tmp_path / "eval").glob("head_routing_*.png")] and not [
        p for p in (tmp_path / "eval").glob("head_routing_*.png") if "local_only" in p.name
    ]
