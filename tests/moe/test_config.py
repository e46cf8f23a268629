import pytest

from vlmoe.moe import RouterConfig


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"num_experts": 0}, "num_experts"),
        ({"num_experts": 4, "top_k": 5}, "top_k"),
        ({"num_experts": 4, "top_k": 0}, "top_k"),
        ({"num_experts": 4, "jitter_noise": -0.1}, "jitter_noise"),
        ({"num_experts": 4, "temperature": 0.0}, "temperature"),
        ({"num_experts": 4, "capacity_factor": 0.0}, "capacity_factor"),
        ({"num_experts": 4, "min_capacity": -1}, "min_capacity"),
        ({"num_experts": 4, "load_balance_coef": -1.0}, "load_balance_coef"),
        ({"num_experts": 4, "z_loss_coef": -1.0}, "z_loss_coef"),
        ({"num_experts": 4, "input": "image"}, "input"),
        ({"num_experts": 4, "input": "cluster"}, "num_clusters"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        RouterConfig(**kwargs)


def test_capacity_formula():
    config = RouterConfig(num_experts=4, top_k=2, capacity_factor=1.5, min_capacity=4)
    assert config.capacity(10) == max(4, 8)  # ceil(1.5 * 10 * 2 / 4) = 8
    assert config.capacity(1) == 4  # min_capacity wins
    assert RouterConfig(num_experts=4).capacity(10) is None


def test_dict_round_trip_and_unknown_keys():
    config = RouterConfig(num_experts=8, top_k=2, z_loss_coef=0.001)
    assert RouterConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown key.*'topk'"):
        RouterConfig.from_dict({"num_experts": 2, "topk": 1}, where="config.json")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("normalize_top_k", "false", "true or false"),  # a non-empty string would be read as true
        ("straight_through", 1, "true or false"),
        ("top_k", "2", "an integer"),
        ("num_experts", 4.0, "an integer"),
        ("min_capacity", True, "an integer"),
        ("z_loss_coef", None, "a number"),
        ("temperature", "0.1", "a number"),
        ("capacity_factor", "1.25", "a number or null"),
        ("load_balance_scope", "local", "one of ['device', 'global']"),
        ("input", 0, "one of ['token', 'cluster']"),
    ],
)
def test_a_value_of_the_wrong_type_names_where_the_key_the_value_and_the_type(key, value, expected):
    data = {"num_experts": 4, key: value}
    with pytest.raises(ValueError) as error:
        RouterConfig.from_dict(data, where="m/config.json 'router'")
    assert str(error.value) == f"m/config.json 'router': {key} is {value!r}; expected {expected}"
    # Built from Python the same check runs, so a top_k=2.0 fails here and not inside torch.
    with pytest.raises(ValueError) as error:
        RouterConfig(**data)
    assert str(error.value) == f"{key} is {value!r}; expected {expected}"


def test_a_float_top_k_or_a_string_num_experts_from_python_is_refused_on_construction():
    with pytest.raises(ValueError) as error:
        RouterConfig(num_experts=4, top_k=2.0)
    assert str(error.value) == "top_k is 2.0; expected an integer"
    with pytest.raises(ValueError) as error:
        RouterConfig(num_experts="4")
    assert str(error.value) == "num_experts is '4'; expected an integer"
    assert RouterConfig(num_experts=4, temperature=1).temperature == 1  # a whole number is a number


def test_from_dict_still_checks_the_ranges():
    config = RouterConfig.from_dict({"num_experts": 4, "capacity_factor": 2, "load_balance_coef": 0})
    assert config.capacity_factor == 2  # a whole number is a number
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, num_experts=4\], got 5"):
        RouterConfig.from_dict({"num_experts": 4, "top_k": 5})
    with pytest.raises(ValueError) as error:
        RouterConfig.from_dict({"num_experts": 4, "z_loss_coef": -1.0}, where="m/config.json 'router'")
    assert str(error.value) == "m/config.json 'router': z_loss_coef must be >= 0, got -1.0"


def test_from_dict_names_a_missing_key_instead_of_a_bare_type_error():
    with pytest.raises(ValueError) as error:
        RouterConfig.from_dict({"top_k": 2}, where="m/config.json 'router'")
    assert str(error.value).startswith("m/config.json 'router': missing key(s) ['num_experts']")


def test_numpy_scalars_are_taken_as_the_python_numbers_they_are():
    import json

    import numpy as np

    config = RouterConfig(
        num_experts=np.int64(8),
        top_k=np.int32(2),
        temperature=np.float32(0.5),
        capacity_factor=np.float32(1.5),
    )
    assert config == RouterConfig(num_experts=8, top_k=2, temperature=0.5, capacity_factor=1.5)
    assert type(config.num_experts) is int and type(config.temperature) is float
    assert RouterConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config  # saves as JSON
    with pytest.raises(ValueError, match=r"top_k is np.float32\(2.0\); expected an integer"):
        RouterConfig(num_experts=4, top_k=np.float32(2.0))  # a float is still not a count


@pytest.mark.parametrize(
    "key", ["jitter_noise", "load_balance_coef", "z_loss_coef", "capacity_factor", "temperature"]
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_infinite_numbers_are_refused(key, value):
    # NaN passed the range checks (every comparison with it is false): a NaN jitter or coefficient
    # made the logits or the aux loss NaN, and an infinite capacity failed in math.ceil at forward.
    with pytest.raises(ValueError) as error:
        RouterConfig.from_dict({"num_experts": 4, key: value}, where="m/config.json 'router'")
    assert str(error.value) == f"m/config.json 'router': {key} must be a finite number, got {value}"
