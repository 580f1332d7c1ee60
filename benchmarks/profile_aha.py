"""Where the time of the AHA forward goes, and launch variants of it (GPU; shapes as `bench_aha.py`).

Prints, for N in --ns: the device time per kernel of one forward and one forward+backward (torch.profiler);
the pair lists, the routed lists alone and the local lists alone (one launch each, `do_bench` medians);
the local lists under other tile configs; then the whole op under the launch variants given by
environment settings (each first checked against the float64 reference at small shapes, `bench_aha.py`).

    python benchmarks/profile_aha.py --ns 32768,131072 --out prof_out
"""

from __future__ import annotations

import argparse
import json
import math
import os
from functools import partial
from pathlib import Path

import torch
from bench_aha import _inputs, check_correctness, cuda_run_log
from bench_attention import _fwd_bwd, bench

from l2a.ops import all_or_here_attention
from l2a.ops.triton import _flash, _flash_fwd
from l2a.ops.triton.aha import _list_view, aha_rows

# name -> environment settings of one variant of the op
VARIANTS = {
    "split (default)": "",
    "packed": "L2A_AHA_FWD_LAUNCH=packed",
    "split, one routed tile a program": "L2A_AHA_FWD_LAUNCH=split L2A_AHA_ROUTED_TILES=1",
}
# local lists alone: (BLOCK_M, BLOCK_N, warps, stages, short blocks)
LOCAL_CONFIGS = [
    (128, 64, 8, 3, 8),
    (128, 64, 8, 2, 8),
    (64, 64, 4, 3, 8),
    (64, 64, 4, 2, 8),
    (128, 32, 8, 3, 12),
    (64, 32, 4, 3, 12),
]


class env:
    """Set L2A_* variables for a block."""

    def __init__(self, settings: str):
        self.settings = dict(item.split("=", 1) for item in settings.split())

    def __enter__(self):
        os.environ.update(self.settings)

    def __exit__(self, *exc):
        for name in self.settings:
            os.environ.pop(name)


def kernel_times(fn, steps: int = 5) -> list[tuple[str, float]]:
    """(kernel name, device µs per call) of `fn`, from torch.profiler."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    out = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if t > 0:
            out.append((e.key[:60], t / steps))
    return sorted(out, key=lambda x: -x[1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ns", type=lambda s: [int(x) for x in s.split(",")], default=[32768, 131072])
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--active", type=float, default=0.07)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    parser.add_argument("--out", type=Path, default=Path("prof_out"))
    args = parser.parse_args()
    device, log = cuda_run_log("profile_aha", args.out)
    results = []

    def record(**row) -> None:
        results.append(row)
        log(json.dumps(row))

    names = [v for v in args.variants.split(",") if v]
    failures = check_correctness(device, (128,))  # forward and backward, default launch
    log("check default (fwd+bwd): " + ("passed" if not failures else "FAILED " + "; ".join(failures)))
    ok = {}

    def checked(name: str) -> bool:
        if name not in ok:
            with env(VARIANTS[name]):
                failures = check_correctness(device, (128,))
            ok[name] = not failures
            log(f"check {name}: " + ("passed" if ok[name] else "FAILED " + "; ".join(failures)))
        return ok[name]

    w = args.window
    scale = 1 / math.sqrt(128)
    for n in args.ns:
        q, k, v, dout, active = _inputs(n, args.active, device)
        op = partial(all_or_here_attention, q, k, v, active, w, backend="triton")
        for what, fn in (("fwd", op), ("fwd+bwd", _fwd_bwd(op, (q, k, v), dout))):
            for kernel, us in kernel_times(fn):
                record(N=n, profile=what, kernel=kernel, us=round(us, 1))
        record(N=n, part="pair lists", ms=bench(partial(aha_rows, q, k, active, w, None, None)))
        rows = aha_rows(q, k, active, w, None, None, packed=False)
        out, lse = _flash._row_outputs(q, None)
        cfg = _flash.fwd_config(128)
        for part, short, tiles in ((0, 0, 1), (0, 0, 8), (1, 0, 1), (1, 12, 1)):
            view = _list_view(rows, part)
            c = cfg if part == 0 else _flash.aha_local_fwd_config(128)
            ms = bench(partial(_flash_fwd.launch_forward, q, k, v, view, out, lse, scale, c, short, tiles))
            name = ("routed" if part == 0 else "local") + " lists alone"
            record(N=n, part=name, config=c.__dict__, short=short, tiles_per_program=tiles, ms=ms)
        best = (None, float("inf"))
        for bm, bn, warps, stages, short in LOCAL_CONFIGS:
            c = _flash.Config(bm, bn, warps, stages)
            view = _list_view(rows, 1)
            try:
                ms = bench(partial(_flash_fwd.launch_forward, q, k, v, view, out, lse, scale, c, short))
            except Exception as e:  # noqa: BLE001  (out of resources)
                record(N=n, part="local lists", config=[bm, bn, warps, stages], error=type(e).__name__)
                continue
            record(N=n, part="local lists", config=[bm, bn, warps, stages], short=short, ms=ms)
            if ms < best[1]:
                best = ((bm, bn, warps, stages, short), ms)
        if best[0] is not None and "split, best local config" not in VARIANTS:
            VARIANTS["split, best local config"] = "L2A_AHA_FWD_LAUNCH=split L2A_AHA_FWD_LOCAL=" + ",".join(
                map(str, best[0][:4])
            )
            names.append("split, best local config")
            log("split, best local config: " + VARIANTS["split, best local config"])
        for name in names:
            if not checked(name):
                continue
            with env(VARIANTS[name]):
                fwd = bench(op)
                fb = bench(_fwd_bwd(op, (q, k, v), dout)) if name in ("split (default)", "packed") else None
            record(N=n, variant=name, fwd_ms=fwd, fwd_bwd_ms=fb)
        del q, k, v, dout, active, rows, out, lse
        torch.cuda.empty_cache()
    (args.out / "profile_aha.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
