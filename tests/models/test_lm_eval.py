"""lm-evaluation-harness itself scores a converted tiny L2A model as users call it
(`lm_eval.simple_evaluate(model="hf", model_args="pretrained=PATH,trust_remote_code=True", ...)`, in a fresh
process that never imported l2a, no network), on two tasks defined on local data: a loglikelihood task
and a generate_until task. Its numbers must equal the same model scored directly (sums of
log-probabilities by hand; greedy `generate`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from l2a.data import byte_tokenizer

pytest.importorskip("lm_eval")

MAX_GEN_TOKS = 6
# lm-eval as users call it from Python; only the tasks of include_path are indexed (include_defaults=False
# skips parsing the hundreds of built-in task folders, which dominates the run time on a small machine).
LM_EVAL_SCRIPT = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
model_dir, task_dir, out_file = sys.argv[1:]
out = lm_eval.simple_evaluate(
    model="hf",
    model_args=f"pretrained={model_dir},trust_remote_code=True,dtype=float32",
    tasks=["l2a_local_loglikelihood", "l2a_local_generate"],
    task_manager=TaskManager(include_path=task_dir, include_defaults=False),
    device="cpu",
    batch_size=2,
    log_samples=True,
)
with open(out_file, "w") as f:
    json.dump({"results": out["results"], "samples": out["samples"]}, f, default=str)
"""
LL_TASK = """task: l2a_local_loglikelihood
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
  - metric: acc
"""
GEN_TASK = """task: l2a_local_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: exact_match
"""


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _loglikelihood(model, tokenizer, context: str, target: str) -> tuple[float, bool]:
    """Sum of log p(target token | prefix) over the target's tokens, and whether each is the argmax."""
    ctx, cont = _ids(tokenizer, context), _ids(tokenizer, target)
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont[:-1]]), use_cache=False).logits[0, len(ctx) - 1 :]
    logprobs = logits.double().log_softmax(-1)
    cont_t = torch.tensor(cont)
    ll = logprobs.gather(-1, cont_t[:, None]).sum().item()
    return ll, bool((logits.argmax(-1) == cont_t).all())


def _greedy_text(model, tokenizer, prompt: str) -> str:
    ids = torch.tensor([_ids(tokenizer, prompt)])
    out = model.generate(ids, max_new_tokens=MAX_GEN_TOKS, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _samples(samples: list[dict]) -> list[dict]:
    """lm-eval's logged samples (log_samples=True), in document order."""
    return sorted(samples, key=lambda s: s["doc_id"])


def test_lm_eval_numbers_equal_direct_scoring(tiny_l2a, fresh_process_env, tmp_path):
    tokenizer = byte_tokenizer()
    special = {"vocab_size": 259, "pad_token_id": 256, "bos_token_id": 257, "eos_token_id": 258}
    model = tiny_l2a("qwen3", window=4, base=special).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 256, 258
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    # loglikelihood docs: half with a one-character target the model predicts greedily (acc 1), so that
    # acc is not trivially 0, half with longer targets
    gen = torch.Generator().manual_seed(0)
    letters = torch.randint(0, 26, (40, 9), generator=gen)
    contexts = ["".join(chr(97 + int(c)) for c in row) for row in letters]
    greedy_rows, other_rows = [], []
    for i, context in enumerate(contexts):
        with torch.no_grad():
            nxt = int(model(torch.tensor([_ids(tokenizer, context)]), use_cache=False).logits[0, -1].argmax())
        if 33 <= nxt <= 126 and len(greedy_rows) < 3:
            greedy_rows.append({"context": context, "target": chr(nxt)})
        elif len(other_rows) < 3:
            other_rows.append({"context": context, "target": f" x{i}y"})
    assert len(greedy_rows) == 3 and len(other_rows) == 3
    ll_rows = greedy_rows + other_rows
    prompts = ["q: 12+5=", "q: hello", "q: abcdefgh", "q: zz"]
    gen_rows = [
        {"prompt": p, "target": _greedy_text(model, tokenizer, p) if i % 2 == 0 else "no such answer"}
        for i, p in enumerate(prompts)
    ]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "ll.yaml").write_text(LL_TASK.format(data=_write_jsonl(tmp_path / "ll.jsonl", ll_rows)))
    (tasks / "gen.yaml").write_text(
        GEN_TASK.format(data=_write_jsonl(tmp_path / "gen.jsonl", gen_rows), max_gen_toks=MAX_GEN_TOKS)
    )

    env = fresh_process_env(tmp_path)
    env["HF_DATASETS_CACHE"] = str(tmp_path / "datasets")
    proc = subprocess.run(
        [sys.executable, "-c", LM_EVAL_SCRIPT, str(model_dir), str(tasks), str(tmp_path / "out.json")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert list((tmp_path / "hf_modules").rglob("modeling_l2a.py")), "lm-eval must load through the shim"
    out = json.loads((tmp_path / "out.json").read_text())
    results = out["results"]

    # loglikelihood: each sample's value and greediness, and the aggregates
    expected = [_loglikelihood(model, tokenizer, r["context"], r["target"]) for r in ll_rows]
    samples = _samples(out["samples"]["l2a_local_loglikelihood"])
    assert len(samples) == len(ll_rows)
    for sample, (ll, greedy) in zip(samples, expected):
        assert sample["arguments"][0] == [ll_rows[sample["doc_id"]][k] for k in ("context", "target")]
        (got_ll, got_greedy) = sample["resps"][0][0]
        assert got_ll == pytest.approx(ll, abs=1e-4), sample["doc_id"]
        assert got_greedy == greedy, sample["doc_id"]
    lls = torch.tensor([ll for ll, _ in expected], dtype=torch.float64)
    assert results["l2a_local_loglikelihood"]["perplexity,none"] == pytest.approx(
        torch.exp(-lls.mean()).item(), rel=1e-4
    )
    assert results["l2a_local_loglikelihood"]["acc,none"] == pytest.approx(0.5)
    assert [greedy for _, greedy in expected] == [True] * 3 + [False] * 3

    # generate_until: each sample's text, and exact_match
    samples = _samples(out["samples"]["l2a_local_generate"])
    assert [s["filtered_resps"][0] for s in samples] == [_greedy_text(model, tokenizer, p) for p in prompts]
    assert results["l2a_local_generate"]["exact_match,none"] == pytest.approx(0.5)
