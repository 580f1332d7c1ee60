"""Experiments built from the library (above training and evaluation, below the CLI).

- `l2a.experiments.reproduction`: the small-scale reproduction of the paper's main result (issue 13),
  resumable stages driven by a config (`l2a reproduce CONFIG --out DIR`).
"""

from l2a.experiments.config import ARMS, ReproductionConfig, load_reproduction_config
from l2a.experiments.reproduction import STAGES, run_reproduction

__all__ = ["ARMS", "STAGES", "ReproductionConfig", "load_reproduction_config", "run_reproduction"]
