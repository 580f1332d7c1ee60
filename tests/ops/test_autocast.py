"""Under autocast the ops run in the autocast dtype, as SDPA does, whatever mix of dtypes they get."""

import pytest
import torch

from l2a.ops import conditional_attention, sliding_window_attention
from l2a.ops.reference import conditional_attention_reference, sliding_window_attention_reference


@pytest.mark.parametrize("op", ["conditional", "sliding_window"])
def test_autocast_mixed_inputs_run_in_autocast_dtype(op):
    q = torch.randn(1, 12, 4, 16)
    k = torch.randn(1, 12, 2, 16)
    v = torch.randn(1, 12, 2, 16).bfloat16()  # as a bf16 v_proj next to fp32 norm/rotary outputs
    active = torch.rand(1, 12) < 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if op == "conditional":
            out = conditional_attention(q, k, v, active, backend="torch")
        else:
            out = sliding_window_attention(q, k, v, 5, backend="torch")
    assert out.dtype == torch.bfloat16
    args = (q.bfloat16().double(), k.bfloat16().double(), v.double())
    if op == "conditional":
        ref, _ = conditional_attention_reference(*args, active, 0.25)
    else:
        ref, _ = sliding_window_attention_reference(*args, 5, 0.25)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_mixed_dtypes_without_autocast_is_an_error():
    q = torch.randn(1, 8, 2, 16)
    v = torch.randn(1, 8, 2, 16).bfloat16()
    with pytest.raises(TypeError, match="share a dtype"):
        sliding_window_attention(q, q, v, 4, backend="torch")
