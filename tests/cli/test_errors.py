"""What every command shares: --version, a light `--help`, one-line errors, Ctrl-C, path checks, --force."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import l2a
from l2a.cli import main
from l2a.cli._common import UsageError, check_model_path, looks_local, prepare_output_dir, run_command

SRC = str(Path(l2a.__file__).resolve().parents[1])


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"l2a {l2a.__version__}"


HELP_IS_LIGHT = """
import sys
from l2a.cli import main
for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["demo", "--help"], ["convert", "--help"]):
    try:
        main(argv)
    except SystemExit as exit:
        assert exit.code == 0, argv
assert "transformers" not in sys.modules and "torch" not in sys.modules, "--help imported the library"
from l2a.ops import conditional_attention, sliding_window_attention
assert "transformers" not in sys.modules, "l2a.ops imported transformers"
print("light")
"""

REGISTERS = """
from transformers import AutoConfig
config = AutoConfig.for_model("l2a", num_hidden_layers=1, hidden_size=8, num_attention_heads=2)
print(type(config).__module__)
"""


def test_help_and_ops_import_neither_transformers_nor_torch():
    result = _python(HELP_IS_LIGHT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("light")


@pytest.mark.parametrize("order", ["import l2a, transformers", "import transformers, l2a"])
def test_import_l2a_still_registers_with_transformers_in_either_order(order):
    result = _python(order + "\n" + REGISTERS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "l2a.models.configuration"


def test_user_errors_are_one_line_with_exit_code_2(capsys):
    def fails(_):
        raise ValueError("first line\n  second line")

    assert run_command("train", fails, None) == 2
    assert capsys.readouterr().err == "l2a train: error: first line second line\n"
    assert (
        run_command("eval", lambda _: (_ for _ in ()).throw(FileNotFoundError(2, "No such file", "x")), None)
        == 2
    )
    assert capsys.readouterr().err == "l2a eval: error: No such file: 'x'\n"


def test_bugs_keep_their_traceback():
    def bug(_):
        raise RuntimeError("internal")

    with pytest.raises(RuntimeError, match="internal"):
        run_command("train", bug, None)


def test_debug_variable_reraises(monkeypatch):
    monkeypatch.setenv("L2A_DEBUG", "1")
    with pytest.raises(ValueError):
        run_command("train", lambda _: (_ for _ in ()).throw(ValueError("x")), None)


def test_keyboard_interrupt_in_process(capsys):
    def interrupted(_):
        raise KeyboardInterrupt

    assert run_command("demo", interrupted, None) == 130
    assert capsys.readouterr().err.strip() == "l2a demo: interrupted"


def test_ctrl_c_is_a_short_message_and_exit_130():
    code = (
        "import signal, sys, time\n"
        # a shell's background job starts with SIGINT ignored (and Python keeps it so): restore what a
        # terminal user has, so the test does not depend on how the suite was launched
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from l2a.cli._common import run_command\n"
        "def wait(_):\n    print('ready', flush=True)\n    time.sleep(60)\n"
        "sys.exit(run_command('train', wait, None))\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip() == "l2a train: interrupted"


@pytest.mark.parametrize(
    "path, local",
    [("./model", True), ("../model", True), ("/abs/model", True), ("~/model", True), ("a/b/c", True),
     ("has space", True), ("Qwen/Qwen3-8B", False), ("gpt2", False)],
    ids=["dot", "dotdot", "absolute", "home", "three-parts", "space", "hub-id", "bare-name"],
)  # fmt: skip
def test_looks_local(path, local):
    assert looks_local(path) is local


def test_missing_local_paths_are_refused_before_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(UsageError, match=r"model 'runs/missing' does not exist"):
        check_model_path("runs/missing")  # the parent dir exists here: a local path
    with pytest.raises(UsageError, match=r"model directory 'runs' has no config.json"):
        check_model_path("runs")
    assert check_model_path("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"  # may be a Hub id: left to transformers
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        UsageError, match=r"'Qwen/Qwen3-8B' does not exist locally \(and HF_HUB_OFFLINE is set\)"
    ):
        check_model_path("Qwen/Qwen3-8B")


def test_force_removes_only_the_commands_outputs_inside_the_directory(tmp_path):
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "model" / "weights.bin").write_text("old")
    (out / "old_plot.png").write_text("old")
    (out / "report.json").write_text("old")
    (out / "notes.txt").write_text("mine")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.png").write_text("keep")
    (out / "linked.png").symlink_to(outside / "keep.png")
    (out / "base").symlink_to(outside, target_is_directory=True)

    with pytest.raises(UsageError, match="is not empty"):
        prepare_output_dir(out, force=False, outputs=("report.json", "*.png", "model", "base"))
    assert (out / "report.json").read_text() == "old"

    prepare_output_dir(out, force=True, outputs=("report.json", "*.png", "model", "base"))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (outside / "keep.png").read_text() == "keep"  # links removed, their targets kept


def test_output_path_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        prepare_output_dir(tmp_path / "f", force=True, outputs=("*",))
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["trian"], "l2a: error: argument COMMAND: invalid choice: 'trian'"),
        ([], "l2a: error: the following arguments are required: COMMAND"),
        (["eval", "m", "--lengths", "4q"], "l2a eval: error: argument --lengths: cannot parse length '4q'"),
        (["train"], "l2a train: error: the following arguments are required: config"),
    ],
    ids=["unknown-command", "no-command", "bad-length", "missing-argument"],
)
def test_argument_mistakes_are_one_line_too(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message), err
