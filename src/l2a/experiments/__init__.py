"""Experiments built from the library (above training and evaluation, below the CLI).

- `l2a.experiments.reproduction`: the small-scale reproduction of the paper's main result (issue 13),
  resumable stages driven by a config (`l2a.experiments.config`; `l2a reproduce CONFIG --out DIR`).

Nothing is imported here, so that `l2a --help` stays light (`l2a.experiments.stages` has the stage names).
"""
