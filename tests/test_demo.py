"""The embedded demo, reduced (`quick=True`): the pipeline runs end to end and writes a sane report."""

import json

import pytest

from l2a.cli import main
from l2a.demo import DemoConfig, format_report, run_demo


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, seed=0, quick=True, threads=1, progress=False)


def test_demo_writes_report_and_plot(quick_report):
    out, report = quick_report
    saved = json.loads((out / "report.json").read_text())
    assert saved["accuracy"] == report["accuracy"]
    assert set(saved["accuracy"]) == {"l2a", "local_only", "all_global"}
    assert all(0.0 <= a <= 1.0 for a in [*saved["accuracy"].values(), saved["base_accuracy"]])
    assert 0.0 <= saved["sparsity"] <= 1.0
    assert len(saved["sparsity_per_layer"]) == len(saved["global_layers"]) == DemoConfig.quick().num_layers
    assert saved["seconds"] > 0
    assert saved["chance"] == pytest.approx(10.0 ** -DemoConfig.quick().value_digits)
    assert saved["min_distance"] > saved["config"]["window"], "evaluation needles must lie beyond the window"
    assert sum(b["queries"] for b in saved["accuracy_by_distance"]) == saved["eval_queries"]
    assert (out / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "local_only" in format_report(saved)


def test_forced_routings_are_respected(quick_report):
    _, report = quick_report
    fraction = report["global_fraction"]
    assert fraction["local_only"] == [0.0] * len(report["global_layers"])
    assert fraction["all_global"] == [1.0] * len(report["global_layers"])
    assert report["sparsity"] == pytest.approx(1.0 - sum(fraction["l2a"]) / len(fraction["l2a"]))
    assert report["routed_last"] is not None and "sparsity" in report["routed_last"]


def test_cli_registers_demo(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_quick_and_config_are_exclusive(tmp_path):
    with pytest.raises(ValueError, match="either quick"):
        run_demo(tmp_path, quick=True, config=DemoConfig())
