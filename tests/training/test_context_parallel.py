"""Context parallelism on CPU (gloo): C = 2 and 4 ranks holding shards of every sequence (and 2 × 2 data ×
context parallel) give the losses, gradient norms, routing statistics and final weights of one process,
with packed documents and sliding windows crossing the shard boundaries, leakage steps and a resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from l2a.layers import L2ADecoderLayer
from l2a.models import L2AForCausalLM
from l2a.training import TrainConfig, train

sys.path.insert(0, str(Path(__file__).parent))
from context_parallel_worker import config_for, cp_batches  # noqa: E402

WORKER = Path(__file__).with_name("context_parallel_worker.py")
LAUNCHES = {2: ("ddp:2", "fsdp:2"), 4: ("fsdp:4", "ddp:2")}  # world -> runs (wrapper:C)


def _launch(world: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           str(WORKER), str(out), *LAUNCHES[world]]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    root = tmp_path_factory.mktemp("context_parallel")
    return {world: _launch(world, root / f"world{world}" / "out.json") for world in LAUNCHES}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process; 2 accumulation micro-steps where the parallel run has 2 data-parallel groups."""
    from context_parallel_worker import tiny_l2a

    runs = {}
    for accum in (1, 2):
        config = config_for(str(tmp_path_factory.mktemp(f"single{accum}")), "none", 1, grad_accum_steps=accum)
        config.checkpoint.resume = None
        config.checkpoint.save_final = False
        model = tiny_l2a()
        runs[accum] = (train(model, None, config, data=cp_batches()).history, model)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4], ids=["world2", "world4"])
def test_wrapped_attention_equals_single_device_ops(launches, world):
    for case, error in launches[world]["ops"].items():
        assert error < 1e-12, case


@pytest.mark.slow
@pytest.mark.parametrize(
    "world, run", [(2, "ddp:2"), (2, "fsdp:2"), (4, "fsdp:4"), (4, "ddp:2")],
    ids=["cp2-ddp", "cp2-fsdp", "cp4-fsdp", "dp2xcp2-ddp"],
)  # fmt: skip
def test_context_parallel_training_equals_one_process(launches, single, world, run):
    wrapper, cp = run.split(":")
    history, model = single[world // int(cp)]
    parallel = launches[world][run]
    assert len(history) == len(parallel["history"]) == 4
    assert sum(r["leakage_steps"] for r in history) > 0
    for a, b in zip(history, parallel["history"], strict=True):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-5)
        assert a["router_regularizer"] == pytest.approx(b["router_regularizer"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["sparsity_per_layer"] == pytest.approx(b["sparsity_per_layer"], abs=1e-6)
        assert a["leakage_steps"] == b["leakage_steps"]
    loaded = L2AForCausalLM.from_pretrained(parallel["checkpoint"])
    for name, param in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], param, rtol=1e-4, atol=1e-5, msg=name)


def test_bad_context_parallel_settings_are_errors(make_l2a):
    from l2a.training.context_parallel import apply_context_parallel

    with pytest.raises(ValueError, match="must divide the number of processes"):
        apply_context_parallel(make_l2a(), 2)
    model = make_l2a()
    model.model.layers[1].__class__ = type("OwnAttentionLayer", (L2ADecoderLayer,), {})
    with pytest.raises(ValueError, match=r"L2ADecoderLayer only .* \['OwnAttentionLayer'\]"):
        apply_context_parallel(model, 2)
    with pytest.raises(ValueError, match="needs an L2A model"):
        apply_context_parallel(torch.nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match="multiple of parallel.context_parallel=3"):
        TrainConfig(parallel={"context_parallel": 3}, data={"seq_len": 32})
    with pytest.raises(ValueError, match="context_parallel must be >= 1"):
        TrainConfig(parallel={"context_parallel": 0})
