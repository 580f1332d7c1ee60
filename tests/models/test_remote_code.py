"""Checkpoints load with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` in a fresh
process that never imported l2a (as lm-eval, RULER and HELMET load models), through the shim that
`save_pretrained` writes; `attn_implementation=` is honoured ("eager") or refused naming attention_backend."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from l2a.cli import main as l2a_main
from l2a.models.configuration import REMOTE_CODE_AUTO_MAP, REMOTE_CODE_FILE
from l2a.training.checkpoint import save_checkpoint

IDS = [[5, 17, 42, 99, 3, 250, 7, 64, 128, 11]]


_LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    ids = torch.tensor(json.loads(sys.argv[1]))
    out = {}
    for path in sys.argv[2:]:
        first = "l2a" not in sys.modules
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        # after the first load l2a is registered and transformers prefers it; import each shim explicitly
        with open(path + "/config.json") as f:
            ref = json.load(f)["auto_map"]["AutoModelForCausalLM"]
        shim_class = get_class_from_dynamic_module(ref, path)
        with torch.no_grad():
            logits = model(ids).logits.tolist()
        out[path] = [first, type(model).__module__, shim_class is type(model), logits]
        if first:  # loading through trust_remote_code registered the classes for auto classes: save again
            model.save_pretrained(path + "-resaved")
    print("RESULT" + json.dumps(out))
    """
)


def _load_in_fresh_process(paths: list[Path], tmp_path: Path, fresh_env: dict) -> dict[str, list]:
    """Load the paths with trust_remote_code in one new process; per path: whether l2a was not yet imported,
    the model class's module, whether the checkpoint's own shim gives that class, the logits of IDS.
    The first model is saved again to `<path>-resaved`."""
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, json.dumps(IDS), *map(str, paths)],
        env=fresh_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.tensor(IDS)).logits


def test_every_saved_checkpoint_loads_with_trust_remote_code(
    make_base, tiny_l2a, fresh_process_env, tmp_path
):
    """save_pretrained, `l2a convert` (convert_checkpoint), `l2a prune` and a training checkpoint."""
    model = tiny_l2a("qwen2", window=4)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)

    base_dir = tmp_path / "base"
    make_base("qwen3").save_pretrained(base_dir)
    converted = tmp_path / "converted"
    assert l2a_main(["convert", str(base_dir), str(converted), "--window", "4"]) == 0

    pruned = tmp_path / "pruned"
    assert l2a_main(["prune", str(saved), str(pruned), "--layers", "0"]) == 0

    trained = save_checkpoint(
        tmp_path / "run",
        3,
        model=model,
        model_state=None,
        trainer_state={"step": 3},
        rank_state={},
        config={},
        keep_last=1,
    )

    paths = [converted, saved, pruned, trained]
    for path in paths:
        config = json.loads((path / "config.json").read_text())
        assert config["auto_map"] == REMOTE_CODE_AUTO_MAP, path
        shim = (path / REMOTE_CODE_FILE).read_text()
        assert "from l2a.models import" in shim and "class " not in shim, "the shim must not copy the library"
    results = _load_in_fresh_process(paths, tmp_path, fresh_process_env(tmp_path))
    assert results[str(paths[0])][0], "the first load must run in a process that has not imported l2a"
    for path in paths:
        _, module, shim_gives_class, logits = results[str(path)]
        assert module == "l2a.models.modeling", path  # the installed package's class, not a copy
        assert shim_gives_class, path
        expected = _logits(AutoModelForCausalLM.from_pretrained(path))
        torch.testing.assert_close(torch.tensor(logits), expected, atol=1e-5, rtol=0, msg=str(path))
    # a model loaded through trust_remote_code saves the shim again, not copies of l2a's source files
    resaved = Path(f"{paths[0]}-resaved")
    assert sorted(p.name for p in resaved.glob("*.py")) == [REMOTE_CODE_FILE]
    assert json.loads((resaved / "config.json").read_text())["auto_map"] == REMOTE_CODE_AUTO_MAP
    # the pruned checkpoint really is another model (the comparison above can tell checkpoints apart)
    assert not torch.allclose(torch.tensor(results[str(pruned)][3]), _logits(model), atol=1e-3)


@pytest.mark.parametrize("implementation", ["sdpa", "flash_attention_2", "flex_attention"])
def test_unsupported_attn_implementation_names_attention_backend(implementation, tiny_l2a, tmp_path):
    tiny_l2a("qwen3", window=4).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="attention_backend") as err:
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=implementation)
    assert repr(implementation) in str(err.value) and "\n" not in str(err.value)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="attention_backend"):
        model.set_attn_implementation(implementation)


def test_eager_attn_implementation_and_attention_backend_are_honoured(tiny_l2a, tmp_path):
    model = tiny_l2a("qwen3", window=4)
    model.save_pretrained(tmp_path)
    eager = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    torch_backend = AutoModelForCausalLM.from_pretrained(tmp_path, attention_backend="torch")
    assert torch_backend.config.attention_backend == "torch"
    torch.testing.assert_close(_logits(eager), _logits(model), atol=0, rtol=0)
    torch.testing.assert_close(_logits(torch_backend), _logits(model), atol=0, rtol=0)
