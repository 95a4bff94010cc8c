"""Shared test setup: deterministic, quiet, CPU-only."""
import os

import pytest
import torch

# Each test process uses both cores of the CI machine; pytest runs tests serially.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
