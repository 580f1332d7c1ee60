"""The fused LM loss on a GPU: Liger-Kernel's fused linear cross-entropy and the chunked PyTorch path against
HF's loss on materialised logits (bf16), all against a float32 reference: loss and gradient errors, time of
forward + backward, peak memory. Refuses to report timings when an error exceeds twice the plain bf16 path's.

    python benchmarks/check_fused_loss.py --tokens 16384 --hidden 4096 --vocab 151936
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from l2a.ops.linear_cross_entropy import liger_available, linear_cross_entropy, shift_labels


def run(impl: str, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab: int):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    if impl in ("plain", "reference"):
        loss = ForCausalLMLoss(h @ w.T, labels, vocab)
    else:
        loss = linear_cross_entropy(h, w, shift_labels(labels), impl=impl)
    loss.backward()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    extra = (torch.cuda.max_memory_allocated() - base) / 2**30
    return loss.detach().float(), h.grad.float(), w.grad.float(), elapsed, extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="runs/check_fused_loss")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(1, args.tokens, args.hidden, device="cuda", generator=gen)
    weight = torch.randn(args.vocab, args.hidden, device="cuda", generator=gen) / args.hidden**0.5
    labels = torch.randint(0, args.vocab, (1, args.tokens), device="cuda", generator=gen)
    labels[:, : args.tokens // 10] = -100
    ref = run("reference", hidden, weight, labels, args.vocab)
    impls = ["plain", "chunked"] + (["liger"] if liger_available() else [])
    rows = {}
    for impl in impls:
        results = [
            run(impl, hidden.bfloat16(), weight.bfloat16(), labels, args.vocab) for _ in range(args.repeats)
        ]
        loss, gh, gw, _, extra = results[-1]
        rows[impl] = {
            "loss_err": float((loss - ref[0]).abs()),
            "grad_hidden_err": float((gh - ref[1]).abs().max()),
            "grad_weight_err": float((gw - ref[2]).abs().max()),
            "ms": 1e3 * min(r[3] for r in results[1:] or results),
            "extra_gib": extra,
        }
    plain = rows["plain"]
    ok = all(
        rows[i][k] <= 2 * plain[k] + 1e-6
        for i in rows
        for k in ("loss_err", "grad_hidden_err", "grad_weight_err")
    )
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "liger": liger_available()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "check_fused_loss.json").write_text(
        json.dumps({"meta": meta, "args": vars(args), "rows": rows})
    )
    print(
        f"T={args.tokens} H={args.hidden} V={args.vocab} bf16 vs fp32 reference; errors within 2x plain: {ok}"
    )
    print("| impl | loss err | max grad hidden err | max grad weight err | fwd+bwd ms | extra GiB |")
    print("|---|---|---|---|---|---|")
    for impl, r in rows.items():
        ms = f"{r['ms']:.1f}" if ok else "(withheld)"
        print(
            f"| {impl} | {r['loss_err']:.2e} | {r['grad_hidden_err']:.2e} | {r['grad_weight_err']:.2e} | "
            f"{ms} | {r['extra_gib']:.2f} |"
        )


if __name__ == "__main__":
    main()
