"""Evaluation of long-context models: RULER-style tasks, perplexity by position, routing analysis,
speed and memory, and the comparison report (``results.json``, ``results.md``, PNG plots).

`l2a eval` (`l2a.cli.eval`) drives `run_evaluation`; each piece is usable on its own.
"""

from l2a.evaluation.common import format_length, parse_length, parse_lengths
from l2a.evaluation.perplexity import PerplexityReport, perplexity_by_position, position_buckets, token_nll
from l2a.evaluation.report import ModelEvaluation, markdown_report, plot_routing, write_report
from l2a.evaluation.routing import RoutingReport, capture_routing, routing_analysis, routing_decisions
from l2a.evaluation.runner import VARIANTS, EvalSettings, evaluate_model, load_model, run_evaluation
from l2a.evaluation.speed import SpeedPoint, SpeedReport, kv_cache_bytes, measure_speed
from l2a.evaluation.tasks import SampleResult, TaskResult, evaluate_tasks, generate_answer, sample_tasks

__all__ = [
    "VARIANTS",
    "EvalSettings",
    "ModelEvaluation",
    "PerplexityReport",
    "RoutingReport",
    "SampleResult",
    "SpeedPoint",
    "SpeedReport",
    "TaskResult",
    "capture_routing",
    "evaluate_model",
    "evaluate_tasks",
    "format_length",
    "generate_answer",
    "kv_cache_bytes",
    "load_model",
    "markdown_report",
    "measure_speed",
    "parse_length",
    "parse_lengths",
    "perplexity_by_position",
    "plot_routing",
    "position_buckets",
    "routing_analysis",
    "routing_decisions",
    "run_evaluation",
    "sample_tasks",
    "token_nll",
    "write_report",
]
