"""Run by `torchrun` from test_context_parallel.py (gloo, CPU). argv: OUT_JSON RUN [RUN ...], each RUN
`WRAPPER:C` (e.g. `fsdp:4`). Rank 0 writes {"ops": max errors of the all-to-all attention wrappers against
the single-device ops, RUN: {"history", "checkpoint"}}.

Every run trains the tiny L2A model (window 8 over 32-token packed rows: windows and documents cross the
shard boundaries) with activation checkpointing for 4 steps with leakage steps, stopping after 2 and resuming
from the checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_l2a  # noqa: E402
from l2a import ops  # noqa: E402
from l2a.training import LoggingConfig, OptimConfig, RouterConfig, TrainConfig, train  # noqa: E402
from l2a.training.context_parallel import apply_context_parallel  # noqa: E402

SEQ_LEN = 32


def cp_batches(n: int = 8) -> list[dict[str, torch.Tensor]]:
    """Packed rows of 2-3 documents with some ignored targets (shared by the test's single-process run)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(0, 256, (1, SEQ_LEN), generator=g)
        cuts = sorted({int(c) for c in torch.randint(3, SEQ_LEN - 3, (1 + i % 2,), generator=g)})
        labels = ids.clone()
        labels[:, : 2 * i] = -100
        rows.append({"input_ids": ids, "labels": labels, "cu_seqlens": torch.tensor([0, *cuts, SEQ_LEN])})
    return rows


def config_for(output_dir: str, wrapper: str, cp: int, **overrides) -> TrainConfig:
    fields = dict(
        output_dir=output_dir,
        device="cpu",
        steps=4,
        parallel={"data_parallel": wrapper, "context_parallel": cp},
        optim=OptimConfig(lr=1e-2),
        router=RouterConfig(regularizer_weight=1e-2, leakage_probability=0.5),
        logging=LoggingConfig(every=1, progress_bar=False),
        checkpoint={"keep_last": 1, "resume": "auto"},
        data={"seq_len": SEQ_LEN},
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def check_ops(world: int) -> dict[str, float]:
    """Wrapped ops on shards vs the plain ops on the whole sequence: outputs, lse and q/k/v gradients."""
    cp = apply_context_parallel(tiny_l2a(), world)
    g = torch.Generator().manual_seed(1)
    n, hq, hkv, d = 8 * world, 4, 2, 16
    q, k, v = (torch.randn(1, n, h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, 5, n - 3, n], dtype=torch.int32)
    token_active = torch.rand(1, n, generator=g) < 0.5
    head_active = torch.rand(1, n, hq, generator=g) < 0.5
    cut = slice(cp.index * 8, (cp.index + 1) * 8)
    errors = {}
    cases = {
        "conditional-token": (ops.conditional_attention, cp.conditional_attention, (token_active,)),
        "conditional-head": (ops.conditional_attention, cp.conditional_attention, (head_active,)),
        "window": (ops.sliding_window_attention, cp.sliding_window_attention, (6,)),
    }
    for name, (op, wrapped, extra) in cases.items():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = op(*leaves, *[e for e in extra], cu_seqlens=cu, return_lse=True, backend="torch")
        (out.square().sum() + lse.masked_fill(lse.isinf(), 0).sum()).backward()
        shards = [t[:, cut].clone().requires_grad_() for t in (q, k, v)]
        local_extra = [e[:, cut] if isinstance(e, torch.Tensor) else e for e in extra]
        out_s, lse_s = wrapped(*shards, *local_extra, cu_seqlens=cu, return_lse=True, backend="torch")
        (out_s.square().sum() + lse_s.masked_fill(lse_s.isinf(), 0).sum()).backward()
        # the gradient of a shard's keys collects the contributions of every rank's queries
        err = max(
            (out_s - out[:, cut]).abs().max(),
            (lse_s - lse[..., cut]).nan_to_num(posinf=0, neginf=0).abs().max(),
        )
        for full, shard in zip(leaves, shards, strict=True):
            err = max(err, (shard.grad - full.grad[:, cut]).abs().max())
        errors[name] = float(err)
    return errors


def main() -> None:
    out, runs = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"ops": check_ops(world)}
    rows = cp_batches()
    for run in runs:
        wrapper, cp = run.split(":")
        dp_rank, dp_world = rank // int(cp), world // int(cp)
        mine = rows[dp_rank::dp_world]  # the ranks of a context-parallel group read the same rows
        # activation checkpointing: the recomputation in the backward attends through the all-to-alls too
        config = config_for(
            str(out.parent / f"run-{wrapper}-{cp}"), wrapper, int(cp), gradient_checkpointing=True
        )
        first = train(tiny_l2a(), None, config, data=mine[:2])
        second = train(tiny_l2a(seed=1), None, config, data=mine)
        results[run] = {"history": first.history + second.history, "checkpoint": str(second.checkpoint)}
    if rank == 0:
        out.write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
