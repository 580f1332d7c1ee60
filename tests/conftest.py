"""Shared test settings: small thread count (CI has 2 cores, xdist runs 2 workers) and fixed seeds."""

import random

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    torch.manual_seed(0)
    yield
