"""Run a function on several CPU processes joined by torch.distributed (gloo).

``run_distributed(fn, world_size, *args)`` starts one fresh process per rank, calls
``fn(rank, world_size, *args)`` in each after ``init_process_group``, and returns the
ranks' return values in rank order. A rank's exception is re-raised in the caller with
the rank's traceback attached; ranks that are still running after ``timeout`` seconds
are killed and ``TimeoutError`` is raised, so a collective that never completes cannot
hang the test suite.
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# After the first rank fails, how long the others get to finish before they are killed:
# they are usually blocked in a collective with the failed rank and would wait forever.
FAILURE_GRACE_S = 2.0
PORT_ATTEMPTS = 3
PORT_CLASHES = ("address already in use", "connectfullmesh failed")  # init errors retried on a fresh port
PRELOAD_MODULES = ["torch", "torch.distributed", "ring_adasplash", "ring_adasplash.parallel"]


class RemoteTraceback(Exception):
    """Carries a rank's traceback text; set as ``__cause__`` of the re-raised exception."""

    def __str__(self) -> str:
        return self.args[0]


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, backend, timeout, seed, result_dir, fn, args):
    """Body of one spawned rank: set up, run ``fn``, write the outcome to ``result_dir``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    # Several ranks share two cores: one thread each avoids oversubscription.
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    stage = "init"
    try:
        # The parent's deadline must fire first, so a hang reads as a hang, not a gloo error.
        pg_timeout = timedelta(seconds=timeout + 60)
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=pg_timeout)
        stage = "run"
        outcome = ("ok", fn(rank, world_size, *args))
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent
        text = traceback.format_exc()
        try:
            pickle.dumps(exc)
            picklable = exc
        except Exception:  # noqa: BLE001
            picklable = None
        outcome = ("error", stage, picklable, f"{type(exc).__name__}: {exc}", text, time.time())
    path = Path(result_dir) / f"rank{rank}.pkl"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(outcome))
    tmp.rename(path)  # atomic: the parent never reads a half-written file


def _read_outcome(result_dir: str, rank: int):
    path = Path(result_dir) / f"rank{rank}.pkl"
    return pickle.loads(path.read_bytes()) if path.exists() else None


def _kill(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=10)


def _launch(fn, world_size, args, timeout, backend, seed):
    """One attempt: returns (outcomes by rank, ranks still running at the deadline)."""
    # Fresh processes as with "spawn", but forked from a server that has already imported
    # torch: a rank starts in ~0.1 s instead of ~3 s. Modules that fail to import are skipped.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD_MODULES)
    with tempfile.TemporaryDirectory(prefix="run_distributed_") as result_dir:
        port = free_port()
        procs = [
            ctx.Process(
                target=_worker,
                args=(rank, world_size, port, backend, timeout, seed, result_dir, fn, args),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        failed_at = None
        try:
            while any(p.is_alive() for p in procs):
                now = time.monotonic()
                if now >= deadline or (failed_at is not None and now >= failed_at + FAILURE_GRACE_S):
                    break
                wait([p.sentinel for p in procs if p.is_alive()], timeout=0.1)
                if failed_at is None and any(
                    (o := _read_outcome(result_dir, r)) is not None and o[0] == "error" for r in range(world_size)
                ):
                    failed_at = time.monotonic()
            hung = [r for r, p in enumerate(procs) if p.is_alive()]
        finally:
            _kill(procs)
        outcomes = [_read_outcome(result_dir, r) for r in range(world_size)]
        exitcodes = [p.exitcode for p in procs]
    return outcomes, hung, exitcodes


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120,
    backend: str = "gloo",
    seed: int = 0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return their results.

    ``fn`` and ``args`` must be picklable (``fn`` defined at module level). Every rank is
    seeded with the same ``seed`` so that ranks can draw identical global inputs and keep
    their own shard. Raises the first failing rank's exception (with its remote traceback
    as ``__cause__``), or ``TimeoutError`` if any rank is still running after ``timeout``.
    """
    for attempt in range(PORT_ATTEMPTS):
        outcomes, hung, exitcodes = _launch(fn, world_size, args, timeout, backend, seed)
        errors = [(r, o) for r, o in enumerate(outcomes) if o is not None and o[0] == "error"]
        # Another process may take the port between free_port() and the bind, or the ranks of another
        # call (a parallel test worker) may meet on it, which breaks the mesh: retry then.
        port_taken = any(o[1] == "init" and any(m in o[4].lower() for m in PORT_CLASHES) for _, o in errors)
        if not (port_taken and attempt + 1 < PORT_ATTEMPTS):
            break

    if errors:
        # The earliest failure is the cause; later ones are peers losing their connection.
        rank, (_, _, exc, summary, text, _) = min(errors, key=lambda e: e[1][5])
        remote = RemoteTraceback(f"\n\nrank {rank} of {world_size} failed:\n{text}")
        if exc is None:
            raise RuntimeError(f"rank {rank} of {world_size} failed: {summary}") from remote
        if hasattr(exc, "add_note"):
            exc.add_note(f"(raised on rank {rank} of {world_size})")
        raise exc from remote
    if hung:
        raise TimeoutError(
            f"ranks {hung} of {world_size} were still running after {timeout}s and were killed "
            f"(a collective that not every rank entered?)"
        )
    missing = [r for r, o in enumerate(outcomes) if o is None]
    if missing:
        codes = {r: exitcodes[r] for r in missing}
        raise RuntimeError(f"ranks {missing} of {world_size} died without a result (exit codes {codes})")
    return [o[1] for o in outcomes]


def value_error_message(call) -> str:
    """What ``call()`` raises as a ``ValueError`` on this rank, or "no error" (the bad-input cases,
    whose every rank must raise)."""
    try:
        call()
    except ValueError as exc:
        return str(exc)
    return "no error"
