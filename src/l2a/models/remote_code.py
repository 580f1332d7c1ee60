"""Remote-code entry point of L2A checkpoints.

`save_pretrained` copies this file next to every L2A checkpoint as `modeling_l2a.py`, and the saved
`config.json` points its `auto_map` here, so that tools which load models with
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` in a process that never imported `l2a`
(lm-evaluation-harness, RULER, HELMET) find the classes. It only re-exports the installed `l2a` package:
install it (`pip install l2a`) wherever such a checkpoint is loaded.
"""

from l2a.models import L2AConfig, L2AForCausalLM, L2AModel

__all__ = ["L2AConfig", "L2AForCausalLM", "L2AModel"]
