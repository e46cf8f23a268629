"""Data for sparse MoE vision-language models.

- Synthetic charts (ChartMoE-Align style): `sample_chart_record` → PNG (`ChartRenderer`), table
  (`chart_table`), JSON (`chart_json`, schemas in `CHART_JSON_SCHEMAS`), plotting code
  (`plotting_code`), QA with Program-of-Thought (`chart_questions`); on disk with
  `generate_chart_set` / `vlmoe data charts`.
- LLaVA conversations: `read_conversations` (JSON, JSONL, `datasets`) with a bad-sample report,
  `mix_sources` (weights, domain tags), `ConversationCollator` (chat template, label masks).
- MoCLE instruction clusters: `fit_instruction_clusters`, `assign_clusters` / `vlmoe data cluster`.
"""

from typing import Any

from vlmoe.data.chart_code import plotting_code
from vlmoe.data.chart_dataset import ChartSetConfig, chart_set_shards, generate_chart_set
from vlmoe.data.chart_qa import QA_KINDS, ChartQuestion, chart_questions
from vlmoe.data.chart_record import CHART_TYPES, ChartRecord, sample_chart_record
from vlmoe.data.chart_render import ChartRenderer
from vlmoe.data.chart_text import CHART_JSON_SCHEMAS, chart_json, chart_table
from vlmoe.data.conversations import BadSampleError, ConversationSample, LoadReport, read_conversations
from vlmoe.data.mixing import MixtureSource, mix_sources

# These need torch / sentence-transformers: imported on first use, so that chart generation
# (and `vlmoe data charts` worker start-up) does not pay for torch.
_LAZY = {
    "InstructionClusters": "vlmoe.data.clustering",
    "assign_clusters": "vlmoe.data.clustering",
    "fit_instruction_clusters": "vlmoe.data.clustering",
    "load_clusters": "vlmoe.data.clustering",
    "save_clusters": "vlmoe.data.clustering",
    "IGNORE_INDEX": "vlmoe.data.collator",
    "ConversationCollator": "vlmoe.data.collator",
    "split_model_inputs": "vlmoe.data.collator",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'vlmoe.data' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = [
    "CHART_JSON_SCHEMAS",
    "CHART_TYPES",
    "IGNORE_INDEX",
    "QA_KINDS",
    "BadSampleError",
    "ChartQuestion",
    "ChartRecord",
    "ChartRenderer",
    "ChartSetConfig",
    "ConversationCollator",
    "ConversationSample",
    "InstructionClusters",
    "LoadReport",
    "MixtureSource",
    "assign_clusters",
    "chart_json",
    "chart_questions",
    "chart_set_shards",
    "chart_table",
    "fit_instruction_clusters",
    "generate_chart_set",
    "load_clusters",
    "mix_sources",
    "plotting_code",
    "read_conversations",
    "sample_chart_record",
    "save_clusters",
    "split_model_inputs",
]
