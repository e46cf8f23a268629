"""Routing analysis: which experts a sparse model uses, for which tokens, domains and patches.

`collect_routing` runs a model over samples and returns `RoutingStats` (saved as JSON + npz, so
plots redraw without the model); `write_report` draws every picture as a PNG and one
self-contained HTML page. The command line is `vlmoe analyze`.
"""

from vlmoe.analysis.ablation import AblationTable, read_ablation
from vlmoe.analysis.cli import load_model, run_analyze
from vlmoe.analysis.collect import BatchImages, RoutingCollector
from vlmoe.analysis.logs import read_log_history, router_series
from vlmoe.analysis.report import write_report
from vlmoe.analysis.run import AnalysisSample, collect_routing, from_eval_samples, read_samples, routed_layers
from vlmoe.analysis.stats import LayerInfo, PatchMap, RoutingStats, expert_load_entropy

__all__ = [
    "AblationTable",
    "AnalysisSample",
    "BatchImages",
    "LayerInfo",
    "PatchMap",
    "RoutingCollector",
    "RoutingStats",
    "collect_routing",
    "expert_load_entropy",
    "from_eval_samples",
    "load_model",
    "read_ablation",
    "read_log_history",
    "read_samples",
    "routed_layers",
    "router_series",
    "run_analyze",
    "write_report",
]
