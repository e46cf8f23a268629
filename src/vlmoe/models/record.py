"""The surgery record: typed dataclasses saved as the `vlmoe` section of the model's config.json.

Each surgery function appends one step; `vlmoe.load` rebuilds the base architecture and replays
the steps in order before loading weights, so the record is the one source of truth for layout.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal

from torch import nn

from vlmoe.moe.config import check_type

RECORD_VERSION = 1
CONFIG_KEY = "vlmoe"  # the key of the record inside config.json


@dataclass
class UpcycleFFN:
    """`upcycle_ffn`: these LM layers' MLPs became `MoEFeedForward` (MoE-LLaVA)."""

    layers: list[int]
    num_experts: int
    top_k: int
    load_balance_coef: float
    z_loss_coef: float
    capacity_factor: float | None
    # Fields added later have defaults, so records written before them still load.
    min_capacity: int = 0
    load_balance_first_choice: bool = False
    kind: Literal["upcycle_ffn"] = "upcycle_ffn"


@dataclass
class AddMoLE:
    """`add_mole`: LoRA experts on these layers' MLP linears, plain LoRA on attention."""

    layers: list[int]
    num_experts: int
    rank: int
    alpha: float
    top_k: int
    router: Literal["token", "cluster"]
    num_clusters: int
    universal: bool
    dropout: float
    temperature: float
    load_balance_coef: float
    straight_through: bool
    attention_lora: bool
    router_bias: bool = False
    kind: Literal["add_mole"] = "add_mole"


@dataclass
class InstallConnector:
    """`install_moe_connector`: the projector became an `MoEConnector` (ChartMoE)."""

    init: Literal["aligned", "upcycle", "random"]
    num_experts: int
    top_k: int
    load_balance_coef: float
    z_loss_coef: float
    kind: Literal["install_moe_connector"] = "install_moe_connector"


@dataclass
class ImportCheckpoint:
    """`vlmoe.interop`: the model was converted from another library's checkpoint.

    Records where it came from and the layout changes a stock transformers class needs to hold
    it (e.g. Phi-2's LM head has a bias, LLaVA's has none), so `vlmoe.load` rebuilds them.
    """

    source: str  # "moe-llava" or "llava-mole"
    lm_head_bias: bool = False
    checkpoint: str = ""  # the name of the checkpoint it came from (provenance, for the model card)
    kind: Literal["import"] = "import"


@dataclass
class MergeLoRA:
    """`merge_lora`: every plain and universal LoRA was folded into its base weight. The wrappers
    stay (with nothing left in them but routed experts, if any), so the weights keep their names."""

    kind: Literal["merge_lora"] = "merge_lora"


Step = UpcycleFFN | AddMoLE | InstallConnector | ImportCheckpoint | MergeLoRA
_STEP_TYPES: dict[str, type] = {
    "upcycle_ffn": UpcycleFFN,
    "add_mole": AddMoLE,
    "install_moe_connector": InstallConnector,
    "import": ImportCheckpoint,
    "merge_lora": MergeLoRA,
}


@dataclass
class SurgeryRecord:
    """Which family the model is and which surgeries were applied to it, in order."""

    family: str
    steps: list[Step] = field(default_factory=list)
    version: int = RECORD_VERSION

    def kinds(self) -> list[str]:
        return [step.kind for step in self.steps]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "family": self.family,
            "steps": [asdict(step) for step in self.steps],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config.json 'vlmoe' section") -> SurgeryRecord:
        if not isinstance(data, dict) or set(data) != {"version", "family", "steps"}:
            raise ValueError(f"{where}: expected keys version, family, steps; got {data!r}")
        for name, hint in (("version", int), ("family", str), ("steps", list)):
            check_type(data[name], hint, f"{where}: {name}")
        if data["version"] != RECORD_VERSION:
            raise ValueError(
                f"{where}: record version {data['version']} but this vlmoe reads version {RECORD_VERSION}; "
                "install the vlmoe version that saved the model"
            )
        steps = []
        for position, step in enumerate(data["steps"]):
            kind = step.get("kind") if isinstance(step, dict) else None
            if kind not in _STEP_TYPES:
                raise ValueError(
                    f"{where}: step {position} has kind {kind!r}; known kinds are {list(_STEP_TYPES)}"
                )
            step_type = _STEP_TYPES[kind]
            known = {f.name for f in fields(step_type)}
            required = {f.name for f in fields(step_type) if f.default is MISSING}
            if not required <= set(step) <= known:
                raise ValueError(
                    f"{where}: step {position} ({kind}) has keys {sorted(step)}, expected {sorted(known)}"
                )
            hints = typing.get_type_hints(step_type)
            for name, value in step.items():
                check_type(value, hints[name], f"{where}: step {position} ({kind}).{name}")
            steps.append(step_type(**step))
        return cls(family=data["family"], steps=steps, version=data["version"])


def read_record(model: nn.Module) -> SurgeryRecord | None:
    """The surgery record stored on `model.config`, or None for a model no surgery touched."""
    data = getattr(model.config, CONFIG_KEY, None)
    return None if data is None else SurgeryRecord.from_dict(data)


def append_step(model: nn.Module, family: str, step: Step) -> None:
    record = read_record(model) or SurgeryRecord(family=family)
    record.steps.append(step)
    setattr(model.config, CONFIG_KEY, record.to_dict())
