"""A tiny ring communicator: send to the next rank, receive from the previous, overlap, wait."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import telemetry


class RingComm:
    """Point-to-point exchange along the ring ``rank -> rank + 1`` of a process group.

    ``exchange`` posts one send and one receive (``batch_isend_irecv``) and returns at once, so the
    caller computes while data moves; ``Pending.wait`` returns the received tensor.
    """

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.next_rank = self._global((self.rank + 1) % self.world_size)
        self.prev_rank = self._global((self.rank - 1) % self.world_size)

    def _global(self, group_rank: int) -> int:
        """The global rank of ``group_rank`` of this ring's group (the default group: itself)."""
        return dist.get_global_rank(self.group, group_rank) if self.group else group_rank

    def exchange(self, send: torch.Tensor, recv_shape, dense_bytes: int = 0, pass_name: str = "ring") -> "Pending":
        """Send ``send`` to the next rank; receive a tensor of ``recv_shape`` (same dtype) from the previous."""
        send = send.contiguous()
        recv = torch.empty(recv_shape, dtype=send.dtype, device=send.device)
        ops = [dist.P2POp(dist.isend, send, self.next_rank, self.group),
               dist.P2POp(dist.irecv, recv, self.prev_rank, self.group)]
        telemetry.add_bytes(pass_name, send.numel() * send.element_size(), dense_bytes)
        return Pending(dist.batch_isend_irecv(ops), recv, send)


class Pending:
    """An exchange in flight; keeps the send buffer alive until ``wait``."""

    def __init__(self, requests, recv: torch.Tensor, send: torch.Tensor):
        self.requests, self.recv, self._send = requests, recv, send

    def wait(self) -> torch.Tensor:
        for request in self.requests:
            request.wait()
        self._send = None
        return self.recv
