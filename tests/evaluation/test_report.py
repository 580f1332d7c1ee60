"""The report: results.json, the markdown tables and the PNG plots from synthetic results."""

import json

import pytest
import torch

from l2a.evaluation.perplexity import PerplexityReport
from l2a.evaluation.report import ModelEvaluation, markdown_report, write_report
from l2a.evaluation.routing import RoutingExample, RoutingReport
from l2a.evaluation.speed import SpeedPoint, SpeedReport
from l2a.evaluation.tasks import SampleResult, TaskResult

PNG = b"\x89PNG\r\n\x1a\n"


def _results() -> list[ModelEvaluation]:
    tasks = [
        TaskResult(
            "niah_single_1",
            4096,
            100.0,
            2,
            [
                SampleResult(0.5, "1", ["1"], 100.0, 4096, 1500),
                SampleResult(0.1, "2", ["2"], 100.0, 4096, 3000),
            ],
            router_fraction=[0.5, 0.1],
        ),
        TaskResult(
            "niah_single_1",
            8192,
            50.0,
            2,
            [SampleResult(0.9, "3", ["3"], 100.0, 8192, 1), SampleResult(0.1, "x", ["4"], 0.0, 8192, 2500)],
            router_fraction=[0.3, 0.1],
        ),
        TaskResult("vt", 4096, 80.0, 2, router_fraction=[0.2, 0.0]),
        TaskResult("vt", 8192, 40.0, 2, router_fraction=[0.2, 0.0]),
    ]
    ppl = PerplexityReport(8, [1, 2, 4, 8], 3, [3, 6, 12], [2.0, 1.5, 1.0], [7.39, 4.48, 2.72], 1.3, 3.67)
    decisions = torch.zeros(2, 50, dtype=torch.bool)
    decisions[:, 10:14] = True
    routing = RoutingReport(
        layers=[0, 1],
        task_fraction=[0.25, 0.05],
        needle_fraction=[1.0, 0.5],
        haystack_fraction=[0.2, 0.01],
        per_task={"niah_single_1": [0.25, 0.05]},
        num_task_tokens=100,
        num_needle_tokens=4,
        example=RoutingExample("niah_single_1", [0, 1], decisions, [(10, 14)]),
    )
    speed = SpeedReport(
        "cpu",
        "float32",
        1,
        4,
        2,
        1,
        1000,
        "n/a (CPU)",
        [SpeedPoint(4096, 12.5, 327680, 2.0, 500, 2**20, None)],
    )
    dense_speed = SpeedReport(
        "cpu",
        "float32",
        1,
        4,
        2,
        1,
        1000,
        "n/a (CPU)",
        [SpeedPoint(4096, 25.0, 163840, 2.0, 500, 2**20, None)],
    )
    l2a = ModelEvaluation("tiny", {"path": "ckpt", "variant": "l2a"}, tasks, [ppl], routing, speed)
    dense_ppl = PerplexityReport(
        8, [1, 2, 4, 8], 3, [3, 6, 12], [2.5, 2.0, 1.75], [12.2, 7.39, 5.75], 1.9, 6.69
    )
    dense = ModelEvaluation(
        "tiny [all_global]",
        {"path": "ckpt", "variant": "all_global"},
        [TaskResult("vt", 4096, 90.0, 2)],
        [dense_ppl],
        speed=dense_speed,
    )
    return [l2a, dense]


def test_markdown_tables():
    text = markdown_report(_results(), {"samples": 2})
    assert "| model | 4K | 8K | avg | sparsity % |" in text
    # mean over tasks: 4K (100+80)/2 = 90, 8K (50+40)/2 = 45, avg 67.5
    # sparsity 1 - mean(0.5, .1, .3, .1, .2, 0, .2, 0) = 82.5
    assert "| tiny | 90.0 | 45.0 | 67.5 | 82.5 |" in text
    assert "| tiny [all_global] | 90.0 | – | 90.0 | – |" in text
    assert "| tiny | vt | 80.0 | 40.0 |" in text
    assert "| positions | tiny (3 windows) | tiny [all_global] (3 windows) |" in text
    assert "| [2, 4) | 1.5000 | 2.0000 |" in text
    assert "| all: PPL | 3.670 | 6.690 |" in text
    assert "| tiny | 85.0 | 0.150 | 0.750 | 0.105 | – |" in text
    assert "| tiny | 4K | 12.50 | 2.00× | 327680 | 500.0 | 1.0 | n/a |" in text
    assert "| tiny [all_global] | 4K | 25.00 | 1.00× | 163840 |" in text
    assert "Settings: samples `2`" in text
    # needle distances 1500 → [1024, 2048); 3000 and 2500 → [2048, 4096); 1 → [0, 2)
    assert "| model | [0, 2) | [1024, 2048) | [2048, 4096) |" in text
    assert "| tiny | 100.0 (1) | 100.0 (1) | 50.0 (2) |" in text
    assert "| tiny [all_global] | – | – | – |" in text


def test_write_report_files(tmp_path):
    written = write_report(_results(), tmp_path / "out", {"samples": 2})
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [
        "heatmap_tiny.png",
        "heatmap_tiny_all_global.png",
        "perplexity_by_position.png",
        "results.json",
        "results.md",
        "routing_tiny.png",
        "scores_vs_length.png",
    ]
    for path in written.values():
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG
    payload = json.loads(written["json"].read_text())
    assert payload["settings"] == {"samples": 2}
    first = payload["models"][0]
    assert first["label"] == "tiny"
    assert first["task_sparsity"] == pytest.approx(0.825)
    assert first["tasks"][1]["samples"][1]["needle_distance"] == 2500
    assert first["tasks"][1] | {"samples": []} == {
        "task": "niah_single_1",
        "length": 8192,
        "score": 50.0,
        "num_samples": 2,
        "samples": [],
        "router_fraction": [0.3, 0.1],
    }
    assert first["routing"]["mean_sparsity"] == pytest.approx(0.85)
    assert first["speed"]["points"][0]["peak_memory_bytes"] is None


def test_write_report_rejects_duplicate_labels(tmp_path):
    results = _results()
    results[1].label = "tiny"
    with pytest.raises(ValueError, match="unique"):
        write_report(results, tmp_path)


def test_results_json_is_strict_json(tmp_path):
    timed = _results()[0]
    timed.tasks, timed.perplexity, timed.routing = [], [], None  # speed only: no plots to draw
    timed.speed.points[0].decode_tokens_per_s = float("nan")  # as measured with decode_tokens=0
    written = write_report([timed], tmp_path)
    assert sorted(written) == ["json", "markdown"]
    payload = json.loads(
        written["json"].read_text(), parse_constant=lambda name: pytest.fail(f"{name} in JSON")
    )
    assert payload["models"][0]["speed"]["points"][0]["decode_tokens_per_s"] is None
    assert "| tiny | 4K | 12.50 | – | 327680 | – |" in written["markdown"].read_text()
