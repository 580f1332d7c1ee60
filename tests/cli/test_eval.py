"""`l2a eval` end to end on a tiny converted model saved in a temporary directory."""

import json
import re

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from l2a.cli import main
from l2a.data.tokenization import byte_tokenizer

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from l2a.models import convert_model

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=2048,
        eos_token_id=258,
        pad_token_id=256,
    )
    base = Qwen3ForCausalLM(config)
    base.save_pretrained(root / "base")
    model = convert_model(base, sliding_window=32)
    for name, param in model.named_parameters():
        if name.endswith("router.weight"):
            param.data.normal_(0, 0.3)
    model.save_pretrained(root / "tiny-l2a")
    byte_tokenizer().save_pretrained(root / "tiny-l2a")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(
            f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 12
        )
    return root


def test_eval_writes_results_table_and_plots(checkpoints, tmp_path):
    out = tmp_path / "eval"
    code = main(
        [
            "eval",
            str(checkpoints / "tiny-l2a"),
            str(checkpoints / "base"),
            "--tasks",
            "fwe,kv_retrieval",
            "--lengths",
            "512,640",
            "--samples",
            "1",
            "--variants",
            "l2a,all_global",
            "--tokenizer",
            "byte",
            "--perplexity",
            "--ppl-data",
            str(checkpoints / "corpus"),
            "--ppl-seq-len",
            "128",
            "--ppl-windows",
            "2",
            "--routing-texts",
            "1",
            "--speed",
            "--speed-lengths",
            "64",
            "--decode-tokens",
            "2",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    payload = json.loads((out / "results.json").read_text())
    labels = [m["label"] for m in payload["models"]]
    assert labels == ["tiny-l2a [l2a]", "tiny-l2a [all_global]", "base [base]"]
    l2a, dense, base = payload["models"]
    assert l2a["info"]["force_route"] is None and dense["info"]["force_route"] == "all"
    assert base["info"]["model_type"] == "qwen3"
    for model in payload["models"]:
        assert [(t["task"], t["length"]) for t in model["tasks"]] == [
            ("fwe", 512),
            ("fwe", 640),
            ("kv_retrieval", 512),
            ("kv_retrieval", 640),
        ]
        assert all(0 <= t["score"] <= 100 and t["num_samples"] == 1 for t in model["tasks"])
        ppl = model["perplexity"][0]
        assert ppl["seq_len"] == 128 and ppl["num_sequences"] == 2 and ppl["edges"][-1] == 128
        point = model["speed"]["points"][0]
        assert point["length"] == 64 and point["kv_cache_bytes"] > 0 and point["peak_memory_bytes"] is None
    assert dense["task_sparsity"] == 0.0 and 0.0 < l2a["task_sparsity"] < 1.0
    assert base["task_sparsity"] is None
    assert l2a["routing"]["layers"] == [0, 1] and dense["routing"] is None and base["routing"] is None
    # L2A and its dense reference hold the same cache (routing skips queries, not keys)
    assert l2a["speed"]["points"][0]["kv_cache_bytes"] == dense["speed"]["points"][0]["kv_cache_bytes"]
    table = (out / "results.md").read_text()
    assert "| model | 512 | 640 | avg | sparsity % |" in table
    assert "| tiny-l2a [all_global] |" in table and "## Speed and memory" in table
    for name in [
        "scores_vs_length.png",
        "heatmap_tiny-l2a_l2a.png",
        "heatmap_tiny-l2a_all_global.png",
        "heatmap_base_base.png",
        "perplexity_by_position.png",
        "routing_tiny-l2a_l2a.png",
    ]:
        assert (out / name).read_bytes()[:8] == PNG, name


def test_eval_force_route_and_argument_errors(checkpoints, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(
        [
            "eval",
            str(checkpoints / "tiny-l2a"),
            "--force-route",
            "none",
            "--speed",
            "--speed-lengths",
            "48",
            "--decode-tokens",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    payload = json.loads((out / "results.json").read_text())
    assert [m["label"] for m in payload["models"]] == ["tiny-l2a [local_only]"]
    assert payload["models"][0]["info"]["force_route"] == "none"
    capsys.readouterr()
    assert main(["eval", str(checkpoints / "tiny-l2a"), "--out", str(out)]) == 2
    assert "l2a eval: error: nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", str(checkpoints / "tiny-l2a"), "--tasks", "niah", "--lengths", "1k"]) == 2
    assert "l2a eval: error: unknown task(s) ['niah']" in capsys.readouterr().err
    args = ["eval", str(checkpoints / "tiny-l2a"), "--variants", "sparse", "--speed", "--speed-lengths", "8"]
    assert main([*args, "--out", str(tmp_path / "new")]) == 2
    assert "l2a eval: error: variants must be a non-empty subset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(checkpoints / "tiny-l2a"), "--lengths", "4q"])
    assert "cannot parse length '4q'" in capsys.readouterr().err


def test_eval_task_args_reach_prompts_and_results(checkpoints, tmp_path, capsys):
    out = tmp_path / "eval"
    common = ["--lengths", "256", "--samples", "2", "--device", "cpu", "--no-routing", "--no-progress"]
    code = main(
        ["eval", str(checkpoints / "tiny-l2a"), "--tasks", "kv_retrieval", "--out", str(out), *common]
        + ["--task-arg", "kv_retrieval.key_chars=2", "--task-arg", "kv_retrieval.value_digits=4"]
        + ["--task-arg", "kv_retrieval.min_distance=100"]
    )
    assert code == 0
    payload = json.loads((out / "results.json").read_text())
    expected = {"key_chars": 2, "value_digits": 4, "min_distance": 100}
    assert payload["settings"]["task_args"] == {"kv_retrieval": expected}
    samples = payload["models"][0]["tasks"][0]["samples"]
    assert all(len(s["answers"][0]) == 4 and s["needle_distance"] >= 100 for s in samples)

    model = str(checkpoints / "tiny-l2a")
    capsys.readouterr()
    assert (
        main(["eval", model, "--tasks", "kv_retrieval", "--task-arg", "kv_retrieval.digits=2", *common]) == 2
    )
    assert "task 'kv_retrieval' has no argument 'digits'" in capsys.readouterr().err
    assert main(["eval", model, "--tasks", "kv_retrieval", "--task-arg", "vt.num_chains=2", *common]) == 2
    assert "task arguments given for ['vt'], which are not among the tasks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", model, "--tasks", "kv_retrieval", "--task-arg", "key_chars=2", *common])
    assert "must look like TASK.KEY=VALUE" in capsys.readouterr().err


def _no_model_loads(monkeypatch):
    """Mistakes must be found before any model loads."""
    import l2a.evaluation.runner

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(l2a.evaluation.runner, "load_model", refuse)


BAD_INPUTS = {
    "unknown-task": (["--tasks", "kv_retreival"], r"unknown task\(s\) \['kv_retreival'\]; did you mean"),
    "length-too-short": (
        ["--tasks", "niah_single_1", "--lengths", "64"],
        "niah_single_1: length 64 is too short",
    ),
    "cuda": (["--tasks", "vt", "--device", "cuda:7"], "device 'cuda:7' requested but"),
    "dtype": (["--tasks", "vt", "--dtype", "float8"], "dtype must be 'auto' or one of"),
    "missing-tokenizer": (["--tasks", "vt", "--tokenizer", "./tok"], "tokenizer './tok' does not exist"),
    "missing-corpus": (["--perplexity", "--ppl-data", "./corpus"], "corpus source './corpus' does not exist"),
    "samples": (["--samples", "0", "--tasks", "vt"], "samples must be positive, got 0"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_line_before_any_model_loads(checkpoints, tmp_path, monkeypatch, capsys, name):
    extra, message = BAD_INPUTS[name]
    if "--lengths" not in extra:
        extra = [*extra, "--lengths", "256"]
    _no_model_loads(monkeypatch)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "eval"
    code = main(["eval", str(checkpoints / "tiny-l2a"), "--out", str(out), "--no-progress", *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("l2a eval: error: "), err
    assert re.search(message, err), err
    assert not out.exists()


def test_missing_model_paths_are_refused_without_a_hub_lookup(tmp_path, monkeypatch, capsys):
    _no_model_loads(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for path in ["./nowhere", "runs/nowhere", str(tmp_path / "nowhere")]:
        assert main(["eval", path, "--tasks", "vt", "--lengths", "256", "--out", str(tmp_path / "o")]) == 2
        assert capsys.readouterr().err == f"l2a eval: error: model {path!r} does not exist\n"


def test_out_is_never_overwritten_without_force(checkpoints, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", str(checkpoints / "tiny-l2a"), "--tasks", "fwe", "--lengths", "512", "--samples", "1",
            "--tokenizer", "byte", "--device", "cpu", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert (out / "routing_tiny-l2a.png").exists()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"l2a eval: error: output directory {str(out)!r} is not empty "
        "(use --force to replace an earlier run's results)\n"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    (out / "notes.txt").write_text("mine")
    assert main([*args, "--no-routing", "--force"]) == 0
    assert not (out / "routing_tiny-l2a.png").exists(), "a plot of the earlier run survived --force"
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == [
        "heatmap_tiny-l2a.png", "notes.txt", "results.json", "results.md", "scores_vs_length.png",
    ]  # fmt: skip
