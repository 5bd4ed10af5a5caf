"""One small collective before any exchange that could hang: every rank must agree."""
from __future__ import annotations

import torch.distributed as dist


def check_same_on_all_ranks(description: dict, group=None, error: Exception | None = None) -> None:
    """Raise the same kind of error on every rank if any rank's input is bad or differs.

    ``description``: numbers and strings that must match across ranks (shapes, options).
    ``error``: a validation error this rank found locally; instead of raising it alone (the
    other ranks would wait forever in the next exchange), every rank learns of it here.
    Costs one ``all_gather_object`` of a few bytes.
    """
    world = dist.get_world_size(group)
    gathered = [None] * world
    dist.all_gather_object(gathered, (None if error is None else f"{type(error).__name__}: {error}", description),
                           group=group)
    failed = [(rank, message) for rank, (message, _) in enumerate(gathered) if message]
    if failed:
        if error is not None:
            raise error
        rank, message = failed[0]
        raise ValueError(f"rank {rank} rejected its input: {message}")
    first = gathered[0][1]
    differing = sorted({key for _, desc in gathered for key in desc if desc.get(key) != first.get(key)})
    if differing:
        per_rank = {key: [desc.get(key) for _, desc in gathered] for key in differing}
        raise ValueError(f"ranks disagree on {', '.join(differing)} (values by rank: {per_rank}); every rank "
                         "must pass shards of the same shape and the same options")
