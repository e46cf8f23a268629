"""The surgery record read back from config.json: a valid record round-trips; a value of the wrong
JSON type is refused, naming where, the field, the value and what it must be."""

from __future__ import annotations

import copy

import pytest

from vlmoe.models.record import AddMoLE, SurgeryRecord, UpcycleFFN

WHERE = "m/config.json 'vlmoe'"
RECORD = {
    "version": 1,
    "family": "llava",
    "steps": [
        {
            "layers": [0, 2],
            "num_experts": 4,
            "top_k": 2,
            "load_balance_coef": 0.01,
            "z_loss_coef": 0.0,
            "capacity_factor": None,
            "min_capacity": 0,
            "load_balance_first_choice": False,
            "kind": "upcycle_ffn",
        },
        {
            "layers": [1],
            "num_experts": 4,
            "rank": 4,
            "alpha": 8,  # a whole number given for a float is saved as one
            "top_k": 1,
            "router": "cluster",
            "num_clusters": 4,
            "universal": True,
            "dropout": 0.0,
            "temperature": 0.1,
            "load_balance_coef": 0.0,
            "straight_through": False,
            "attention_lora": True,
            "router_bias": False,
            "kind": "add_mole",
        },
        {
            "init": "aligned",
            "num_experts": 2,
            "top_k": 2,
            "load_balance_coef": 0.0,
            "z_loss_coef": 0.0,
            "kind": "install_moe_connector",
        },
        {"source": "moe-llava", "lm_head_bias": True, "checkpoint": "phi-2", "kind": "import"},
        {"kind": "merge_lora"},
    ],
}


def _edited(step: int | None, key: str, value: object) -> dict:
    data = copy.deepcopy(RECORD)
    (data if step is None else data["steps"][step])[key] = value
    return data


def test_a_valid_record_round_trips():
    record = SurgeryRecord.from_dict(copy.deepcopy(RECORD), where=WHERE)
    assert record.kinds() == ["upcycle_ffn", "add_mole", "install_moe_connector", "import", "merge_lora"]
    assert isinstance(record.steps[0], UpcycleFFN) and isinstance(record.steps[1], AddMoLE)
    assert record.to_dict() == RECORD
    assert (
        SurgeryRecord.from_dict(_edited(0, "capacity_factor", 2), where=WHERE).steps[0].capacity_factor == 2
    )


@pytest.mark.parametrize(
    ("step", "key", "value", "message"),
    [
        (None, "version", "1", "version is '1'; expected an integer"),
        (None, "version", True, "version is True; expected an integer"),
        (None, "family", 3, "family is 3; expected a string"),
        (None, "steps", {}, "steps is {}; expected a list"),
        (0, "num_experts", "four", "step 0 (upcycle_ffn).num_experts is 'four'; expected an integer"),
        (0, "num_experts", 4.0, "step 0 (upcycle_ffn).num_experts is 4.0; expected an integer"),
        (0, "top_k", True, "step 0 (upcycle_ffn).top_k is True; expected an integer"),
        (0, "layers", "all", "step 0 (upcycle_ffn).layers is 'all'; expected a list of integers"),
        (0, "layers", [0, "2"], "step 0 (upcycle_ffn).layers is [0, '2']; expected a list of integers"),
        (
            0,
            "capacity_factor",
            "1.5",
            "step 0 (upcycle_ffn).capacity_factor is '1.5'; expected a number or null",
        ),
        (
            0,
            "load_balance_first_choice",
            1,
            "step 0 (upcycle_ffn).load_balance_first_choice is 1; expected true or false",
        ),
        (1, "universal", "false", "step 1 (add_mole).universal is 'false'; expected true or false"),
        (1, "attention_lora", "no", "step 1 (add_mole).attention_lora is 'no'; expected true or false"),
        (1, "router", "tokens", "step 1 (add_mole).router is 'tokens'; expected one of ['token', 'cluster']"),
        (1, "alpha", "8", "step 1 (add_mole).alpha is '8'; expected a number"),
        (1, "temperature", False, "step 1 (add_mole).temperature is False; expected a number"),
        (
            2,
            "init",
            "aligend",
            "step 2 (install_moe_connector).init is 'aligend'; "
            "expected one of ['aligned', 'upcycle', 'random']",
        ),
        (3, "source", None, "step 3 (import).source is None; expected a string"),
        (3, "lm_head_bias", 0, "step 3 (import).lm_head_bias is 0; expected true or false"),
    ],
)
def test_a_value_of_the_wrong_type_names_where_the_field_the_value_and_the_type(step, key, value, message):
    with pytest.raises(ValueError) as error:
        SurgeryRecord.from_dict(_edited(step, key, value), where=WHERE)
    assert str(error.value) == f"{WHERE}: {message}"
