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
