"""Shared test settings: small thread count (CI has 2 cores, xdist runs 2 workers) and fixed seeds."""

import random

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    torch.manual_seed(0)
    yield


def _all_or_here_standin(
    q, k, v, active, window, *, softmax_scale=None, cu_seqlens=None, key_start=None, return_lse=False, backend="auto"
):
    """Test-only stand-in for `l2a.ops.all_or_here_attention` until the op lands (the `aha-kernel` branch):
    window attention for every (token, head), the far part [0, t - W] for active pairs, merged by
    log-sum-exp, all from today's ops."""
    from l2a.ops import conditional_attention, sliding_window_attention

    common = {"softmax_scale": softmax_scale, "cu_seqlens": cu_seqlens, "key_start": key_start, "backend": backend}
    local, lse_local = sliding_window_attention(q, k, v, window, return_lse=True, **common)
    far, lse_far = conditional_attention(q, k, v, active, key_offset=window, return_lse=True, **common)
    top = torch.maximum(lse_local, lse_far)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w_local, w_far = torch.exp(lse_local - top), torch.exp(lse_far - top)
    denom = w_local + w_far
    lse = torch.where(denom > 0, top + torch.log(denom.clamp_min(1e-30)), torch.full_like(top, float("-inf")))

    def per_row(w):  # (B, Hq, N) -> (B, N, Hq, 1)
        return w.permute(0, 2, 1).unsqueeze(-1)

    compute = torch.promote_types(q.dtype, torch.float32)
    out = (local.to(compute) * per_row(w_local) + far.to(compute) * per_row(w_far)) / per_row(denom).clamp_min(
        1e-30
    )
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


@pytest.fixture(autouse=True)
def _all_or_here_op(monkeypatch):
    """Until `l2a.ops.all_or_here_attention` exists, AHA tests run on the composed stand-in above."""
    import l2a.ops

    if not hasattr(l2a.ops, "all_or_here_attention"):
        monkeypatch.setattr(l2a.ops, "all_or_here_attention", _all_or_here_standin, raising=False)
    yield
