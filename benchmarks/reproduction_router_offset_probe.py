"""Any `l2a` command (e.g. `reproduce`) with every router's logits shifted by OFFSET, so that the routers
start on the global side (soft = sigmoid(OFFSET / temperature) at zero weights): a probe for
docs/reproduction.md ("Routers that start on the global side"), not a library option.

Usage: OFFSET=0.3 python benchmarks/reproduction_router_offset_probe.py reproduce CONFIG --out DIR [--set ...]
"""

import os
import sys

from torch import nn

import l2a.layers.router as router_module
from l2a.cli import main

OFFSET = float(os.environ["OFFSET"])
_forward = router_module.Router.forward


def _shifted_forward(self, hidden_states, force=None, random_fraction=None):
    linear = nn.functional.linear
    # Router.forward computes its logits with nn.functional.linear: shift them for the duration of the call
    nn.functional.linear = lambda x, w, b=None: linear(x, w, b) + OFFSET
    try:
        return _forward(self, hidden_states, force, random_fraction)
    finally:
        nn.functional.linear = linear


if __name__ == "__main__":
    router_module.Router.forward = _shifted_forward
    sys.exit(main(sys.argv[1:]))
