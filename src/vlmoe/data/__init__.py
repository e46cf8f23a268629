"""Data for sparse MoE vision-language models.

- Synthetic charts (ChartMoE-Align style): `sample_chart_record` → PNG (`ChartRenderer`), table
  (`chart_table`), JSON (`chart_json`, schemas in `CHART_JSON_SCHEMAS`), plotting code
  (`plotting_code`), QA with Program-of-Thought (`chart_questions`); on disk with
  `generate_chart_set` / `vlmoe data charts`.
- LLaVA conversations: `read_conversations` (JSON, JSONL, `datasets`) with a bad-sample report,
  `mix_sources` (weights, domain tags), `ConversationCollator` (chat template, label masks).
- MoCLE instruction clusters: `fit_instruction_clusters`, `assign_clusters` / `vlmoe data cluster`.
"""

from vlmoe.data.chart_code import plotting_code
from vlmoe.data.chart_dataset import ChartSetConfig, generate_chart_set
from vlmoe.data.chart_qa import QA_KINDS, ChartQuestion, chart_questions
from vlmoe.data.chart_record import CHART_TYPES, ChartRecord, sample_chart_record
from vlmoe.data.chart_render import ChartRenderer
from vlmoe.data.chart_text import CHART_JSON_SCHEMAS, chart_json, chart_table
from vlmoe.data.clustering import (
    InstructionClusters,
    assign_clusters,
    fit_instruction_clusters,
    load_clusters,
    save_clusters,
)
from vlmoe.data.collator import IGNORE_INDEX, ConversationCollator, split_model_inputs
from vlmoe.data.conversations import BadSampleError, ConversationSample, LoadReport, read_conversations
from vlmoe.data.mixing import MixtureSource, mix_sources

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
