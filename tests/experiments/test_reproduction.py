"""The reproduction pipeline (issue 13) end to end at CPU-tiny scale, its stage skipping and resume."""

import json
import math
from pathlib import Path

import pytest

from l2a.cli import main
from l2a.data import byte_tokenizer
from l2a.experiments.config import load_reproduction_config
from l2a.experiments.reproduction import Reproduction, TrainingRows, _training_pool, run_reproduction
from l2a.experiments.stages import ARMS

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "reproduction-cpu-tiny.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny config run in two invocations: pretrain alone, then everything else (pretrain skipped)."""
    out = tmp_path_factory.mktemp("repro")
    config = load_reproduction_config(CONFIG)
    first = run_reproduction(config, out, ["pretrain"])
    base_weights = (out / "base" / "model.safetensors").stat().st_mtime_ns

    def must_not_run(self):
        raise AssertionError("the pretrain stage ran again although it was done")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Reproduction, "pretrain", must_not_run)
        second = run_reproduction(config, out)
    return out, config, first, second, base_weights


def test_stages_run_once_and_resume(tiny_run):
    out, _, first, second, base_weights = tiny_run
    assert list(first) == ["pretrain"]
    assert list(second) == [*ARMS, "report"]
    assert (out / "base" / "model.safetensors").stat().st_mtime_ns == base_weights
    for stage in ["pretrain", *ARMS, "report"]:
        assert (out / "stages" / f"{stage}.json").is_file()


def test_results_rows_are_complete_and_valid(tiny_run):
    out, config, *_ = tiny_run
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    expected = {(arm, n, task) for arm in ARMS for n in config.eval_lengths for task in config.eval_tasks}
    scored = {(r["arm"], r["length"], r["task"]) for r in rows if r["arm"] in ARMS}
    assert scored == expected
    for row in rows:
        if "score" in row and row["score"] is not None:
            assert 0.0 <= row["score"] <= 100.0
        if "sparsity" in row:
            assert 0.0 <= row["sparsity"] <= 1.0
    by_arm = {arm: [r["sparsity"] for r in rows if r["arm"] == arm and "task" in r] for arm in ARMS}
    assert set(by_arm["clp"]) == {0.0} and set(by_arm["swa"]) == {1.0}
    # the random arm routes at the L2A arm's measured rate (4-sample draws: loose tolerance)
    l2a = json.loads((out / "l2a" / "result.json").read_text())
    routed = sum(l2a["routed_fraction_long"]) / len(l2a["routed_fraction_long"])
    random_sparsity = sum(by_arm["random"]) / len(by_arm["random"])
    assert abs((1 - random_sparsity) - routed) < 0.1
    pruned = [r for r in rows if r["arm"] == "l2a_pruned" and "kv_bytes" in r]
    assert pruned and all(0 < p["kv_bytes"] < p["kv_bytes_unpruned"] for p in pruned)
    assert all(len(p["pruned_layers"]) == 1 for p in pruned)  # half of the tiny model's 2 layers
    assert {t["target"] for t in results["targets"]} >= {"l2a_within_gap_of_clp", "pruning_costs_at_most"}
    import torch

    assert results["stage_environment"]["pretrain"]["torch"] == torch.__version__
    assert results["environment"] == results["stage_environment"]["pretrain"]
    for name in ("report.md", "scores.png", "sparsity.png"):
        assert (out / name).stat().st_size > 0
    assert "## Targets" in (out / "report.md").read_text()


def test_dense_base_learned_the_text(tiny_run):
    """Fails when nothing is learned: an untrained byte model's held-out loss is ~ln 259 = 5.56 nats."""
    out, *_ = tiny_run
    base = json.loads((out / "stages" / "pretrain.json").read_text())["result"]
    assert base["perplexity"]["overall_nll"] < math.log(259) - 1.0


def test_other_config_on_the_same_run_dir_is_refused(tiny_run):
    out, *_ = tiny_run
    changed = load_reproduction_config(CONFIG, ["extend.steps=5"])
    with pytest.raises(ValueError, match="different experiment config"):
        run_reproduction(changed, out)
    # runtime keys (device, progress, workers, ...) may change
    run_reproduction(load_reproduction_config(CONFIG, ["progress=true", "workers=2"]), out, ["report"])


def _tiny_rows(task_ratio: float = 0.5, batch_size: int = 4, **options) -> TrainingRows:
    """Training rows of the tiny config's kv_retrieval pool and a repetitive corpus, 64-token rows."""
    import torch

    tokenizer = byte_tokenizer()
    pool = _training_pool(load_reproduction_config(CONFIG), "test", 40, 56)
    corpus = tokenizer("abcdefgh" * 100, add_special_tokens=False)["input_ids"]
    return TrainingRows(
        pool,
        torch.tensor(corpus),
        seq_len=64,
        batch_size=batch_size,
        task_ratio=task_ratio,
        text_loss_tokens=None,
        pad_token_id=tokenizer.pad_token_id,
        seed="s",
        **options,
    )


def test_training_rows_resume_at_the_same_batch():
    import torch

    stream = _tiny_rows()
    it = iter(stream)
    batches = [next(it) for _ in range(3)]
    resumed = _tiny_rows()
    resumed.load_state_dict({"index": 2})
    again = next(iter(resumed))
    assert torch.equal(again["input_ids"], batches[2]["input_ids"])
    assert torch.equal(again["labels"], batches[2]["labels"])
    assert not torch.equal(batches[0]["input_ids"], batches[1]["input_ids"])
    labelled = (batches[0]["labels"] != -100).sum()
    assert 0 < labelled < batches[0]["labels"].numel()


@pytest.mark.parametrize("task_loss", ["answer", "all"])
def test_task_rows_label_their_answer_or_the_whole_sample(task_loss):
    tokenizer = byte_tokenizer()
    rows = _tiny_rows(task_ratio=1.0, batch_size=8, task_loss=task_loss)
    pool = rows.pool
    batch = rows.batch(0)
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        real = int((ids != tokenizer.pad_token_id).sum())
        labelled = labels != -100
        assert not labelled[real:].any()  # padding is never a target
        prompt = next(
            len(s.input_ids) for s in pool if (s.input_ids + s.answer_ids)[:64] == ids[:real].tolist()
        )
        assert bool(labelled[:prompt].any()) == (task_loss == "all")
        assert labelled[prompt:real].all()


def test_pretraining_continues_a_base_and_stops_at_max_seconds(tiny_run, tmp_path):
    """`init_from` starts from the earlier run's base (lower first loss than a fresh model); `max_seconds`
    stops at the first log step."""
    out, *_ = tiny_run
    config = load_reproduction_config(CONFIG, [f"pretrain.init_from={out}", "pretrain.max_seconds=1e-9"])
    record = run_reproduction(config, tmp_path / "continued", ["pretrain"])["pretrain"]["result"]
    assert record["stopped_by"] == "max_seconds" and record["steps"] == 10
    fresh = json.loads((out / "stages" / "pretrain.json").read_text())["result"]
    first = [json.loads(line) for line in (out / "pretrain" / "train" / "log.jsonl").read_text().splitlines()]
    continued = (tmp_path / "continued" / "pretrain" / "train" / "log.jsonl").read_text().splitlines()
    assert json.loads(continued[0])["lm_loss"] < first[0]["lm_loss"] - 0.5
    assert fresh["stopped_by"] in ("max_steps", "target_score")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["pretrain.task_loss=prompt"], "pretrain.task_loss must be one of"),
        (["extend.nope=1"], "unknown config key"),
        (["extend.arms=[random]"], "random arm needs the l2a arm"),
        (["extend.window=64"], "extend.window=64 must be below data.seq_len=64"),
    ],
    ids=["bad-task-loss", "unknown-key", "random-without-l2a", "window-too-large"],
)
def test_cli_reports_bad_config_in_one_line(tmp_path, capsys, overrides, message):
    args = ["reproduce", str(CONFIG), "--out", str(tmp_path / "run")]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("l2a reproduce: error: ") and message in err and "Traceback" not in err


def test_cli_names_the_report_only_when_it_was_written(tiny_run, capsys):
    """A run of stages without `report` leaves results.json as it was, and says so instead of naming it."""
    out, *_ = tiny_run
    results = out / "results.json"
    before = results.stat().st_mtime_ns
    assert main(["reproduce", str(CONFIG), "--out", str(out), "--stage", "clp"]) == 0
    printed = capsys.readouterr().out
    assert "stages done: clp (report: --stage report)" in printed and "results:" not in printed
    assert results.stat().st_mtime_ns == before
    assert main(["reproduce", str(CONFIG), "--out", str(out), "--stage", "report"]) == 0
    assert f"results: {out}/results.json" in capsys.readouterr().out
    assert results.stat().st_mtime_ns != before


def test_fingerprint_of_the_h200_runs_is_stable_and_new_keys_count_when_set():
    """The H200 runs of 2026-12-01 (docs/reproduction.md) recorded fingerprint 21905da188f027d6 (the full run,
    zero-initialised routers) and 3b8dbb8b8f60879f (the recipe fix, routers offset by 0.3, evaluated at L
    and 4L); keys added since (`extend.router_lr_scale`, `extend.router_logit_offset`) keep a fingerprint
    at their default and change it when set."""
    root = Path(__file__).resolve().parents[2]
    path = root / "configs" / "reproduction-h200.yaml"
    overrides = ["pretrain.max_steps=2500", "pretrain.max_seconds=190", "extend.steps=500"]
    fix = load_reproduction_config(path, [*overrides, "eval.length_factors=[1,4]", "prune.fractions=[0.5]"])
    assert fix.extend.router_logit_offset == 0.3 and fix.fingerprint() == "3b8dbb8b8f60879f"
    config = load_reproduction_config(path, [*overrides, "extend.router_logit_offset=0"])
    assert config.fingerprint() == "21905da188f027d6"
    changed = load_reproduction_config(
        path, [*overrides, "extend.router_logit_offset=0", "extend.router_lr_scale=0.1"]
    )
    assert changed.extend.router_lr_scale == 0.1 and changed.fingerprint() != config.fingerprint()
