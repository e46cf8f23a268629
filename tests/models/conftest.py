import pytest
from model_helpers import tiny_batch

from vlmoe.models import TINY_FAMILIES, tiny


@pytest.fixture(params=TINY_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(family):
    model, processor = tiny(family, seed=0)
    return model, processor, tiny_batch(family, processor)
