"""The attention functions `l2a.layers` calls, looked up at every call so that they can be wrapped from
outside while the layers stay single-device (context parallelism: `l2a.training.context_parallel`).

`ATTENTION_OPS` maps "conditional_attention" / "sliding_window_attention" to functions with the signatures
of `l2a.ops`; `override_attention_ops(...)` swaps them for the duration of a block (process-wide).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

from l2a import ops

ATTENTION_OPS: dict[str, Callable] = {
    "conditional_attention": ops.conditional_attention,
    "sliding_window_attention": ops.sliding_window_attention,
}


@functools.wraps(ops.conditional_attention)
def conditional_attention(*args, **kwargs):
    return ATTENTION_OPS["conditional_attention"](*args, **kwargs)


@functools.wraps(ops.sliding_window_attention)
def sliding_window_attention(*args, **kwargs):
    return ATTENTION_OPS["sliding_window_attention"](*args, **kwargs)


@contextlib.contextmanager
def override_attention_ops(**functions: Callable) -> Iterator[None]:
    """Within the block the layers call `functions` (keys of `ATTENTION_OPS`) instead of `l2a.ops`'."""
    unknown = sorted(set(functions) - set(ATTENTION_OPS))
    if unknown:
        raise ValueError(f"unknown attention ops {unknown}; known: {sorted(ATTENTION_OPS)}")
    saved = dict(ATTENTION_OPS)
    ATTENTION_OPS.update(functions)
    try:
        yield
    finally:
        ATTENTION_OPS.clear()
        ATTENTION_OPS.update(saved)
