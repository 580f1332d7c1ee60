"""DDP / FSDP2 on CPU (gloo, 2 processes under torchrun): the same global batch split over 2 ranks gives the
same losses as 1 rank with 2 accumulation micro-steps, also across a stop and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from l2a.models import L2AForCausalLM
from l2a.training import LoggingConfig, OptimConfig, RouterConfig, TrainConfig, train

WORKER = Path(__file__).with_name("distributed_worker.py")
WRAPPERS = ("ddp", "fsdp")


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """Both wrappers in one torchrun launch (process start-up dominates the cost)."""
    out = tmp_path_factory.mktemp("distributed") / "histories.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(WORKER), str(out), *WRAPPERS]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        log, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:  # timed out: stop torchrun and its workers (its own process group)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("parallel", WRAPPERS)
def test_two_ranks_match_gradient_accumulation(two_rank_runs, make_l2a, make_batches, tmp_path, parallel):
    ranks2 = two_rank_runs[parallel]
    rows = make_batches(8, packed=False, seq_len=24)  # as distributed_worker.batches()
    for i, row in enumerate(rows):
        row["labels"] = row["input_ids"].clone()
        row["labels"][:, : 3 * i] = -100
    config = TrainConfig(
        output_dir=str(tmp_path / "single"),
        device="cpu",
        steps=4,
        grad_accum_steps=2,
        optim=OptimConfig(lr=1e-2),
        router=RouterConfig(regularizer_weight=1e-2, leakage_probability=0.5),
        logging=LoggingConfig(every=1, progress_bar=False),
        checkpoint={"save_final": False},
    )
    model = make_l2a()
    single = train(model, None, config, data=rows).history
    assert len(single) == 4
    for a, b in zip(single, ranks2["history"], strict=True):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-5)
        assert a["router_regularizer"] == pytest.approx(b["router_regularizer"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["leakage_steps"] == b["leakage_steps"]
    # rank 0 saved the full (unsharded) model; it matches the single-process result
    loaded = L2AForCausalLM.from_pretrained(ranks2["checkpoint"])
    for name, param in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], param, rtol=1e-4, atol=1e-5)
