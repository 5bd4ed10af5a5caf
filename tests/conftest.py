"""Shared test setup: deterministic seeds, CPU thread limits, GPU skips, distributed runner, and a
bounds check on every memory access of an interpreted Triton kernel (``interpreter_bounds``)."""
from __future__ import annotations

import functools
import os

import pytest
import torch

import interpreter_bounds
from distributed_utils import run_distributed

TEST_SEED = 0

# every interpreted kernel's loads and stores checked against the tensors of its launch
interpreter_bounds.install()

# Under pytest-xdist every worker shares the machine's few cores with the others.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same torch RNG state."""
    torch.manual_seed(TEST_SEED)


@pytest.fixture
def distributed():
    """``distributed(fn, world_size, *args, timeout=...)``: run ``fn`` on gloo ranks.

    Each spawned rank calls ``torch.manual_seed(TEST_SEED)`` and ``torch.set_num_threads(1)``
    before ``fn(rank, world_size, *args)``, so ranks draw identical global inputs.
    """
    return functools.partial(run_distributed, seed=TEST_SEED)
