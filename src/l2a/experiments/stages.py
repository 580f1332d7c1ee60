"""Names of the reproduction's stages (no imports: the CLI reads them while building its parser)."""

ARMS: tuple[str, ...] = ("clp", "l2a", "swa", "random")
"""The long-context extension arms, in the order they run (random needs L2A's measured sparsity)."""

STAGES: tuple[str, ...] = ("pretrain", *ARMS, "report")
"""Every stage, in run order."""
