"""The multi-process test runner itself: results, errors and hangs."""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from distributed_utils import RemoteTraceback

pytestmark = pytest.mark.distributed


def all_reduce_rank_plus_one(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def report_setup(rank, world_size):
    return dist.get_rank(), dist.get_world_size(), torch.get_num_threads(), torch.rand(3).tolist()


def raise_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("bad shard on purpose")
    return rank


def skip_collective_on_rank_one(rank, world_size):
    t = torch.ones(1)
    if rank == 1:
        # Rank 1 skips the all_reduce and waits for a message rank 0 never sends,
        # while rank 0 waits inside the all_reduce: a deadlock.
        dist.recv(t, src=0)
    else:
        dist.all_reduce(t)
    return t.item()


@pytest.mark.parametrize("world_size", [2, 3])
def test_all_reduce_sum(distributed, world_size):
    expected = world_size * (world_size + 1) / 2
    assert distributed(all_reduce_rank_plus_one, world_size) == [expected] * world_size


def test_ranks_are_set_up_alike(distributed):
    results = distributed(report_setup, 2)
    assert [r[:3] for r in results] == [(0, 2, 1), (1, 2, 1)]
    assert results[0][3] == results[1][3], "same seed on every rank"


def test_rank_exception_is_reraised(distributed):
    with pytest.raises(ValueError, match="bad shard on purpose") as info:
        distributed(raise_on_rank_one, 2)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "rank 1 of 2" in str(cause) and "raise_on_rank_one" in str(cause)


def test_hanging_rank_is_killed(distributed):
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="still running"):
        distributed(skip_collective_on_rank_one, 2, timeout=5)
    assert time.monotonic() - start < 20
