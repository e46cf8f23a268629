"""Training recipes: a YAML file validated into typed dataclasses before any work starts.

A recipe names a base model, an output directory and a list of stages. Each stage says where
it starts from, which surgery is applied first, which data it reads, what is trainable and how
it is optimised. Unknown keys and wrong types raise `RecipeError` naming the file and the key.

    name: chartmoe
    base: {family: llava}              # or {path: /models/llava-1.5-7b}
    output_dir: runs/chartmoe
    stages:
      - name: align_table
        start: base                    # base | previous | <stage name>
        data: {sources: [{name: table, charts: {n: 2000, tasks: [chart_to_table]}}]}
        trainable: [connector]
        learning_rate: {default: 1.0e-3}
        max_steps: 500
    scales:                            # `--scale tiny` merges these over the recipe
      tiny: {stage: {max_steps: 20}, stages: {align_table: {batch_size: 2}}, charts: {n: 40}}
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vlmoe.data.chart_conversations import CHART_TASKS
from vlmoe.data.chart_record import CHART_TYPES
from vlmoe.data.chart_render import MAX_SIZE_PX, MIN_SIZE_PX
from vlmoe.train.validate import (
    AT_LEAST_1,
    FINITE_MORE_THAN_0,
    MORE_THAN_0,
    NOT_NEGATIVE,
    RecipeError,
    check_override_keys,
    check_values,
    from_mapping,
    valid,
)

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "recipes"
PARTS = ("vision_tower", "connector", "router", "experts", "lora", "lm")
CHART_SOURCE_TASKS = (*CHART_TASKS, "chart_type")  # what a synthetic chart source can make


@dataclass
class BaseModelConfig:
    family: str | None = None  # a `vlmoe.models.tiny` family: a random tiny model, no download
    path: str | None = None  # a local HF or vlmoe checkpoint directory
    seed: int = 0  # tiny models only


@dataclass
class ChartDataConfig:
    """Synthetic charts made by `vlmoe.data.generate_chart_set` (cached under the run directory)."""

    n: int = field(default=200, metadata=AT_LEAST_1)
    seed: int = 0
    size_px: int = field(
        default=112,
        # The bounds chart generation checks, here so a recipe fails at load, not stages later.
        metadata=valid(
            lambda px: MIN_SIZE_PX <= px <= MAX_SIZE_PX, f"from {MIN_SIZE_PX} to {MAX_SIZE_PX} pixels"
        ),
    )
    questions_per_chart: int = field(default=4, metadata=NOT_NEGATIVE)
    # Any of vlmoe.data's chart tasks, plus "chart_type" ("What type of chart is this?").
    tasks: list[str] = field(default_factory=lambda: ["chart_to_table"])
    # The last `held_out` charts are kept out of training, for evaluation.
    held_out: int = field(default=0, metadata=NOT_NEGATIVE)
    chart_types: list[str] | None = None  # keep only charts of these types (of the n generated)


@dataclass
class SourceConfig:
    name: str  # the domain tag of its samples
    path: str | None = None  # LLaVA-format JSON/JSONL
    image_root: str | None = None
    charts: ChartDataConfig | None = None
    # Its share of the mixture is weight / the sum of weights. Left out on every source: each
    # source's share is its size, so the mixture (num_samples unset) holds every sample once.
    weight: float | None = field(default=None, metadata=FINITE_MORE_THAN_0)
    tasks: list[str] | None = None  # keep only samples with these task tags
    # A path source's bad samples: "fail" stops at the first (file, line, fix); "skip" leaves them
    # out and reports them (vlmoe.data.read_conversations).
    on_error: Literal["fail", "skip"] = "fail"


@dataclass
class ClusterConfig:
    """MoCLE: cluster the instructions before training; samples carry their cluster id."""

    num_clusters: int = field(default=64, metadata=AT_LEAST_1)
    model: str | None = None  # local sentence-transformers model; default all-MiniLM-L6-v2
    seed: int = 0


@dataclass
class DataConfig:
    sources: list[SourceConfig]
    # The size of the mixture; default the sources' sizes summed (with no weights: every sample once).
    num_samples: int | None = field(default=None, metadata=AT_LEAST_1)
    max_length: int | None = field(default=None, metadata=AT_LEAST_1)
    cluster: ClusterConfig | None = None
    seed: int = 0


# The layer choices of vlmoe.models.surgery (_layer_indices); a list's upper bound is the model's
# number of layers, checked by the surgery.
LAYERS = valid(
    lambda layers: (
        layers in ("all", "every_other")
        if isinstance(layers, str)
        else bool(layers) and all(i >= 0 for i in layers)
    ),
    "'all', 'every_other' or a non-empty list of layer indices (0 or more)",
)
PROBABILITY = valid(lambda p: 0 <= p < 1, "in [0, 1)")


@dataclass
class UpcycleConfig:
    num_experts: int = field(default=4, metadata=AT_LEAST_1)
    top_k: int = field(default=2, metadata=AT_LEAST_1)  # and at most num_experts (check_recipe)
    layers: str | list[int] = field(default="every_other", metadata=LAYERS)
    load_balance_coef: float = field(default=0.01, metadata=NOT_NEGATIVE)
    z_loss_coef: float = field(default=0.0, metadata=NOT_NEGATIVE)
    capacity_factor: float | None = field(
        default=None, metadata=valid(lambda f: f > 0, "more than 0, or null (dropless)")
    )


@dataclass
class MoLEConfig:
    num_experts: int = field(  # 0: plain LoRA everywhere (ChartMoE's LLM LoRA)
        default=4, metadata=valid(lambda n: n >= 0, "0 (plain LoRA) or more")
    )
    rank: int = field(default=16, metadata=AT_LEAST_1)
    alpha: float = field(default=32.0, metadata=MORE_THAN_0)  # 0 would scale the LoRA output to 0
    top_k: int = field(default=1, metadata=AT_LEAST_1)  # and at most num_experts, unless that is 0
    layers: str | list[int] = field(default="all", metadata=LAYERS)
    load_balance_coef: float = field(default=0.01, metadata=NOT_NEGATIVE)
    dropout: float = field(default=0.0, metadata=PROBABILITY)


@dataclass
class MoCLEConfig:
    # At least 1: with 0, add_mole would put plain LoRA there, with no cluster router.
    num_experts: int = field(default=8, metadata=AT_LEAST_1)
    rank: int = field(default=16, metadata=AT_LEAST_1)
    alpha: float = field(default=32.0, metadata=MORE_THAN_0)
    # The router's table of clusters: at least the stage's data.cluster.num_clusters (check_recipe).
    num_clusters: int = field(default=64, metadata=AT_LEAST_1)
    universal: bool = True
    temperature: float = field(default=0.1, metadata=MORE_THAN_0)
    layers: str | list[int] = field(default="all", metadata=LAYERS)


@dataclass
class ConnectorConfig:
    init: Literal["aligned", "upcycle", "random"] = "upcycle"
    num_experts: int = field(default=4, metadata=AT_LEAST_1)  # init "aligned": one per projector instead
    top_k: int = field(default=2, metadata=AT_LEAST_1)  # and at most the number of experts
    # init "aligned": the stages whose projectors become the experts, in order; "base" is the
    # model the stage starts from (ChartMoE's general expert). An entry may also be the directory
    # of a saved model (another run's aligned stage), so several runs share one alignment.
    projectors: list[str] = field(default_factory=list)
    load_balance_coef: float = field(default=0.0, metadata=NOT_NEGATIVE)
    z_loss_coef: float = field(default=0.0, metadata=NOT_NEGATIVE)


@dataclass
class SurgeryConfig:
    """One surgery; exactly one of the fields is set (YAML: `- upcycle: {...}`)."""

    upcycle: UpcycleConfig | None = None
    mole: MoLEConfig | None = None
    mocle: MoCLEConfig | None = None
    connector: ConnectorConfig | None = None


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = field(default=0.0, metadata=NOT_NEGATIVE)
    betas: list[float] = field(
        default_factory=lambda: [0.9, 0.999],
        metadata=valid(lambda b: len(b) == 2 and all(0 <= x < 1 for x in b), "two numbers in [0, 1)"),
    )
    max_grad_norm: float = field(default=1.0, metadata=valid(lambda v: v >= 0, "0 (no clipping) or more"))


@dataclass
class ScheduleConfig:
    name: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "cosine"
    warmup_ratio: float = field(
        default=0.03, metadata=valid(lambda r: 0 <= r < 1, "in [0, 1): a fraction of the steps")
    )


@dataclass
class StageConfig:
    name: str
    data: DataConfig
    trainable: list[str]
    start: str = "previous"  # base | previous | <an earlier stage's name>
    surgery: list[SurgeryConfig] = field(default_factory=list)
    # Per part (router, experts, lora, connector, lm, vision_tower); "default" for the rest.
    learning_rate: dict[str, float] = field(
        default_factory=lambda: {"default": 1.0e-4},
        metadata=valid(lambda lr: lr > 0, "more than 0 (to freeze a part, leave it out of trainable)"),
    )
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch_size: int = field(default=8, metadata=AT_LEAST_1)
    gradient_accumulation: int = field(default=1, metadata=AT_LEAST_1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    max_steps: int = field(  # -1: train `epochs` epochs
        default=-1, metadata=valid(lambda n: n == -1 or n >= 1, "at least 1, or -1 to train `epochs` epochs")
    )
    epochs: float = field(default=1.0, metadata=MORE_THAN_0)
    # Multiplies vlmoe.aux_loss(model); the coefficients are the surgery's.
    aux_loss_scale: float = field(default=1.0, metadata=NOT_NEGATIVE)
    gradient_checkpointing: bool = False
    logging_steps: int = field(default=10, metadata=AT_LEAST_1)
    save_steps: int = field(default=100, metadata=AT_LEAST_1)
    save_total_limit: int = field(
        default=2, metadata=valid(lambda n: n >= 1, "at least 1 (the checkpoints kept)")
    )
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    # The balance loss's expert counts: "device" (each process's batch, as Switch / DeepSpeed-MoE)
    # or "global" (all-reduced over the data-parallel processes first); see README "Multi-GPU".
    load_balance_scope: Literal["device", "global"] = "device"
    fsdp: str = ""  # passed to TrainingArguments (e.g. "full_shard auto_wrap")
    deepspeed: str | None = None  # a DeepSpeed JSON config file
    dataloader_workers: int = field(default=0, metadata=NOT_NEGATIVE)


@dataclass
class Recipe:
    name: str
    base: BaseModelConfig
    output_dir: str
    stages: list[StageConfig]
    seed: int = 0
    description: str = ""
    # {scale name: overrides}: "base"/"output_dir" replace, "stage" merges into every stage,
    # "stages" ({name: overrides}) into one stage, then "charts" into every synthetic-chart source.
    scales: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The file the recipe was read from, for messages; set by load_recipe, not a key of the file.
    source: str = field(default="", metadata={"key": False})

    def stage(self, name: str) -> StageConfig:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with vlmoe.

    >>> builtin_recipes()
    ['chartmoe', 'demo', 'llava-mole', 'mocle', 'moe-llava']
    """
    return sorted(path.stem for path in BUILTIN_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str | Path) -> Path:
    """The file of a built-in recipe name, or the given path (.yaml, or a run's recipe.json)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} does not exist")
        return path
    builtin = BUILTIN_DIR / f"{name_or_path}.yaml"
    if not builtin.is_file():
        raise FileNotFoundError(
            f"no recipe {name_or_path!r}: give a .yaml file, a run's recipe.json or one of "
            f"{', '.join(builtin_recipes())}"
        )
    return builtin


def load_recipe(
    name_or_path: str | Path, scale: str | None = None, output_dir: str | Path | None = None
) -> Recipe:
    """Read, merge the `scale` overrides and validate a recipe: a built-in name, a YAML file, or the
    recipe.json a run wrote (the validated recipe it was started with, after its scale).

    >>> recipe = load_recipe("chartmoe", scale="tiny")
    >>> recipe.base.family, [stage.name for stage in recipe.stages][:2]
    ('llava', ['align_table', 'align_json'])
    """
    path = recipe_path(name_or_path)
    try:
        raw = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except json.JSONDecodeError as error:
        raise RecipeError(f"{path}: not valid JSON: {error}") from None
    except UnicodeDecodeError as error:
        raise RecipeError(
            f"{path}: not a UTF-8 text file (byte {error.object[error.start]:#x} at {error.start}); pass a "
            "YAML recipe or a run's recipe.json"
        ) from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML{_yaml_problem(error)}; fix the file there") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with name, base, output_dir and stages")
    if scale is not None:
        raw = apply_scale(raw, scale, path)
    recipe = from_mapping(Recipe, raw, "", path)
    if output_dir is not None:
        recipe.output_dir = str(output_dir)
    recipe.source = str(path)
    check_recipe(recipe, path, scale)
    return recipe


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Where and what PyYAML found wrong, on one line and in the file's own line numbers (its own
    text spans five lines and names the file "<unicode string>").

    >>> try:
    ...     yaml.safe_load("a: b: c")
    ... except yaml.YAMLError as error:
    ...     _yaml_problem(error)
    ' at line 1, column 5: mapping values are not allowed here'
    """
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if mark is None or problem is None:
        return ": " + " ".join(str(error).split())
    text = f" at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context is not None and context_mark is not None:
        text += f" ({context} from line {context_mark.line + 1}, column {context_mark.column + 1})"
    return text


def apply_scale(raw: dict[str, Any], scale: str, path: Path) -> dict[str, Any]:
    scales = raw.get("scales") or {}
    if not isinstance(scales, dict):
        raise RecipeError(f"{path}: scales: expected a mapping of scale names to overrides, got {scales!r}")
    if not scales:
        raise RecipeError(
            f"{path}: no scale {scale!r}; the recipe defines no scales: run it at its own sizes "
            "(vlmoe train: leave --scale out; vlmoe demo: --scale none)"
        )
    if scale not in scales:
        raise RecipeError(f"{path}: no scale {scale!r}; the recipe defines {sorted(scales)}")
    overrides = scales[scale]
    where = f"scales.{scale}"
    if not isinstance(overrides, dict):
        raise RecipeError(f"{path}: {where}: expected a mapping of overrides, got {overrides!r}")
    unknown = set(overrides) - {"base", "output_dir", "stage", "stages", "charts"}
    if unknown:
        raise RecipeError(
            f"{path}: {where}: unknown key(s) {sorted(unknown)}; use base, output_dir, stage, stages, charts"
        )
    # The keys are checked here, where they are written: once merged, a typo would be reported
    # under stages[i], where the file does not have it.
    check_override_keys(StageConfig, overrides.get("stage", {}), f"{where}.stage", path)
    check_override_keys(ChartDataConfig, overrides.get("charts", {}), f"{where}.charts", path)
    names = [s.get("name") for s in raw.get("stages") or [] if isinstance(s, dict)]
    stages = overrides.get("stages", {})
    if not isinstance(stages, dict):
        raise RecipeError(f"{path}: {where}.stages: expected a mapping of stage names to overrides")
    for name, stage_overrides in stages.items():
        if name not in names:
            raise RecipeError(f"{path}: {where}.stages: no stage named {name!r}; stages are {names}")
        check_override_keys(StageConfig, stage_overrides, f"{where}.stages.{name}", path)
    merged = copy.deepcopy(raw)
    for key in ("base", "output_dir"):
        if key in overrides:
            merged[key] = overrides[key]
    for stage in merged.get("stages") or []:
        if isinstance(stage, dict):
            _deep_merge(stage, overrides.get("stage", {}))
            _deep_merge(stage, overrides.get("stages", {}).get(stage.get("name"), {}))
            for source in (stage.get("data") or {}).get("sources") or []:
                if isinstance(source, dict) and isinstance(source.get("charts"), dict):
                    _deep_merge(source["charts"], overrides.get("charts", {}))
    return merged


def _deep_merge(target: dict, overrides: dict) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def check_recipe(recipe: Recipe, path: Path | str, scale: str | None = None) -> None:
    """Checks across fields (names, references between stages, parts, one surgery per entry) and
    of values (signs and ranges, chart tasks), after `scale` was merged."""
    if (recipe.base.family is None) == (recipe.base.path is None):
        raise RecipeError(f"{path}: base: give exactly one of family (a tiny model) or path")
    if not recipe.stages:
        raise RecipeError(f"{path}: stages: a recipe needs at least one stage")
    seen: list[str] = []
    clusters_after: dict[str, int | None] = {}  # per stage: its model's MoCLE router's clusters
    for i, stage in enumerate(recipe.stages):
        where = f"{path}: stages[{i}] ({stage.name})"
        if stage.name in seen or stage.name in ("base", "previous"):
            raise RecipeError(f"{where}: name must be unique and not 'base'/'previous'")
        if stage.start not in ("base", "previous", *seen):
            raise RecipeError(f"{where}: start {stage.start!r} is not base, previous or an earlier stage")
        for part in [*stage.trainable, *(p for p in stage.learning_rate if p != "default")]:
            if part not in PARTS:
                raise RecipeError(f"{where}: unknown part {part!r}; parts are {', '.join(PARTS)}")
        for j, surgery in enumerate(stage.surgery):
            chosen = [f.name for f in dataclasses.fields(surgery) if getattr(surgery, f.name) is not None]
            if len(chosen) != 1:
                raise RecipeError(
                    f"{where}.surgery[{j}]: give exactly one of upcycle, mole, mocle, connector"
                )
            connector = surgery.connector
            if connector is not None and (connector.init == "aligned") != bool(connector.projectors):
                raise RecipeError(
                    f"{where}.surgery[{j}].connector: projectors are for init aligned, and init aligned "
                    f"needs them (one per expert, e.g. [base, align_table]); got init {connector.init!r} "
                    f"and projectors {connector.projectors}"
                )
            if connector is not None and connector.init == "aligned":
                for name in connector.projectors:
                    if name not in ("base", *seen) and not (Path(name) / "config.json").is_file():
                        raise RecipeError(
                            f"{where}.surgery[{j}].connector.projectors: {name!r} is not 'base', an "
                            f"earlier stage or a saved model directory (one with config.json)"
                        )
        if not stage.data.sources:
            raise RecipeError(f"{where}.data.sources: give at least one source")
        check_values(stage, f"stages[{i}] ({stage.name})", path)
        for j, surgery in enumerate(stage.surgery):
            _check_top_k(surgery, f"{where}.surgery[{j}]")
        # The model a stage starts from, as start_model picks it; a base checkpoint is not read here.
        if stage.start == "base" or not seen:
            started_with = None
        else:
            started_with = clusters_after[seen[-1] if stage.start == "previous" else stage.start]
        clusters_after[stage.name] = _check_clusters(stage, where, started_with)
        weighted = [source.weight is not None for source in stage.data.sources]
        if any(weighted) and not all(weighted):
            unweighted = [source.name for source in stage.data.sources if source.weight is None]
            raise RecipeError(
                f"{where}.data.sources: {unweighted} have no weight while others do; give every source a "
                "weight (shares are weight / their sum), or none (each sample once)"
            )
        for j, source in enumerate(stage.data.sources):
            if (source.path is None) == (source.charts is None):
                raise RecipeError(f"{where}.data.sources[{j}]: give exactly one of path or charts")
            _check_source(source, f"{where}.data.sources[{j}] ({source.name})", scale)
        seen.append(stage.name)


def _check_top_k(surgery: SurgeryConfig, where: str) -> None:
    """top_k at most the number of experts the surgery builds (an aligned connector: its projectors)."""
    for name in ("upcycle", "mole", "connector"):
        config = getattr(surgery, name)
        if config is None or (name == "mole" and config.num_experts == 0):  # plain LoRA: no router
            continue
        experts, of = config.num_experts, "num_experts"
        if name == "connector" and config.init == "aligned":
            experts, of = len(config.projectors), "the number of projectors"
        if config.top_k > experts:
            raise RecipeError(
                f"{where}.{name}.top_k is {config.top_k} but {of} is {experts}; top_k must be from 1 to {of}"
            )


def _check_clusters(stage: StageConfig, where: str, started_with: int | None) -> int | None:
    """The clusters of the MoCLE router in the model `stage` trains (its own mocle surgery's, else
    `started_with`, that of the model it starts from), after checking that the ids data.cluster
    gives the samples, in [0, data.cluster.num_clusters), index that router's table. Without
    data.cluster the ids are the "cluster_id" of a path source's samples, read later."""
    router = started_with
    for surgery in stage.surgery:
        if surgery.mocle is not None:
            router = surgery.mocle.num_clusters
    cluster = stage.data.cluster
    if router is not None and cluster is not None and cluster.num_clusters > router:
        raise RecipeError(
            f"{where}.data.cluster.num_clusters is {cluster.num_clusters} but the MoCLE router has "
            f"{router} clusters (mocle.num_clusters): the cluster ids would run past its table; make "
            f"them equal"
        )
    return router


def _check_source(source: SourceConfig, where: str, scale: str | None) -> None:
    """A chart source's held-out split, its task and chart-type names (checked now, before any chart
    is drawn), and no on_error."""
    charts = source.charts
    if charts is None:
        return
    if source.on_error != "fail":
        raise RecipeError(f"{where}.on_error: applies to path sources; generated charts have no bad samples")
    for key, names, known in (
        ("charts.tasks", charts.tasks, CHART_SOURCE_TASKS),
        ("tasks", source.tasks or [], CHART_SOURCE_TASKS),
        ("charts.chart_types", charts.chart_types or [], CHART_TYPES),
    ):
        unknown = [name for name in names if name not in known]
        if unknown:
            raise RecipeError(
                f"{where}.{key}: unknown name(s) {unknown}; the valid names are {', '.join(known)}"
            )
    if not charts.held_out < charts.n:
        scaled = f" after --scale {scale}" if scale else ""
        fix = f"; scales.{scale}.charts can set both, e.g. {{n: {charts.n}, held_out: {charts.n // 5}}}"
        raise RecipeError(
            f"{where}.charts: held_out is {charts.held_out} but n is {charts.n}{scaled}: every chart would "
            f"be held out and none trained on; held_out must be less than n: lower held_out or raise n"
            f"{fix if scale else ''}"
        )
