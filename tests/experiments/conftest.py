"""The experiments' smoke runs share one prepared data set and pre-trained dense model."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def shared_work(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments-work")
