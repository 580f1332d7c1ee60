"""`l2a demo`: argument mistakes in one line, --out never overwritten without --force (the run is faked)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import l2a.demo
from l2a.cli import main


@pytest.fixture
def fake_demo(monkeypatch):
    """`run_demo` replaced by one that writes what the real one writes (a report, a plot, model dirs)."""
    calls = []

    def fake_run_demo(out_dir, *, seed, config, threads, device, base):
        calls.append(out_dir)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("model", "base"):
            (out / name).mkdir()
            (out / name / "config.json").write_text("{}")
        (out / "routing.png").write_bytes(b"png")
        (out / "report.json").write_text(json.dumps({"seed": seed}))
        return {"model_dir": str(out / "model"), "base_dir": str(out / "base"), "targets_met": True}

    monkeypatch.setattr(l2a.demo, "run_demo", fake_run_demo)
    monkeypatch.setattr(l2a.demo, "format_report", lambda report: "table")
    monkeypatch.setattr(l2a.demo, "task_arg_flags", lambda report: "")
    return calls


def test_out_is_never_overwritten_without_force(fake_demo, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--seed", "1"]) == 0
    before = json.loads((out / "report.json").read_text())
    (out / "loss_curve.png").write_bytes(b"a plot of an earlier run")
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()

    assert main(["demo", "--out", str(out), "--seed", "2"]) == 2
    assert capsys.readouterr().err == (
        f"l2a demo: error: output directory {str(out)!r} is not empty "
        "(use --force to replace an earlier run's results)\n"
    )
    assert json.loads((out / "report.json").read_text()) == before and len(fake_demo) == 1

    assert main(["demo", "--out", str(out), "--seed", "2", "--force"]) == 0
    assert json.loads((out / "report.json").read_text()) == {"seed": 2}
    assert not (out / "loss_curve.png").exists(), "a plot of the earlier run survived --force"
    assert (out / "notes.txt").read_text() == "mine"


BAD_INPUTS = {
    "typo-key": (["--set", "seqlen=256"], "unknown demo config key 'seqlen'; did you mean 'seq_len'?"),
    "not-an-int": (["--set", "seq_len=abc"], "seq_len takes an integer, got 'abc'"),
    "out-of-range": (["--set", "pretrain_steps=0"], "pretrain_steps must be >= 1"),
    "no-equals": (["--set", "seq_len"], "must look like KEY=VALUE"),
    "bad-device": (["--device", "gpu"], "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    "threads": (["--threads", "0"], "--threads must be >= 1, got 0"),
    "missing-base": (["--base", "/nonexistent/base"], "--base /nonexistent/base: base model directory"),
    # the embedded base has the default sizes: another size needs --base scratch
    "embedded-base-sizes": (["--set", "hidden_size=32"], "does not match the demo config"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_runs_nothing(fake_demo, tmp_path, capsys, name):
    extra, message = BAD_INPUTS[name]
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("l2a demo: error: "), err
    assert re.search(re.escape(message), err), err
    assert not fake_demo and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu(fake_demo, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not fake_demo


@pytest.mark.parametrize(
    "passed, quick, status",
    [(True, False, 0), (False, False, 1), (False, True, 0)],
    ids=["passed", "missed-target", "missed-quick"],
)
def test_aha_demo_exit_status_follows_its_verdict(monkeypatch, tmp_path, passed, quick, status):
    """As the L2A demo: a missed target is exit status 1, except for the --quick smoke run."""
    import l2a.demo_aha

    def fake_run_aha_demo(out_dir, **kwargs):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return {"model_dir": "m", "base_dir": "b", "long_tail": None, "verdict": {"passed": passed}}

    monkeypatch.setattr(l2a.demo_aha, "run_aha_demo", fake_run_aha_demo)
    monkeypatch.setattr(l2a.demo_aha, "format_aha_report", lambda report: "table")
    monkeypatch.setattr(l2a.demo, "task_arg_flags", lambda report: "")
    args = ["demo", "--method", "aha", "--out", str(tmp_path / "aha")] + (["--quick"] if quick else [])
    assert main(args) == status
