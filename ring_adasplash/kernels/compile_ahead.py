"""Compile every Triton kernel a call needs at once, on a thread pool, before the call runs.

Left alone, a first call compiles its kernels (about ten) one after another as it reaches them,
much of the time in subprocesses that leave the interpreter free (gcc building Triton's C
launcher of each kernel; ptxas), so compiling them side by side saves most of that time (why:
docs/design.md (kernel choices); ``benchmarks/first_call.py`` measures it).
``compile_ahead(key, dry_run, device)`` runs ``dry_run`` once per key with every launch made through
:func:`launch` replaced by a compile-only ``warmup`` (same arguments, so the same specialization
as the real launch), under ``triton.AsyncCompileMode``: the compiles, and the loading of each
binary with its launcher, run on a thread pool, and the real call after finds them done.

A dry run must read no tensor value on the host (no pass does: the forward is also captured as a
CUDA graph) and may run its PyTorch ops on the unset memory the skipped kernels leave behind.
``RING_ADASPLASH_COMPILE_AHEAD=0`` turns it off (kernels then compile at their first launch).
"""
from __future__ import annotations

import concurrent.futures
import contextvars
import functools
import os
import warnings
from typing import Callable

import torch
import triton

ENV = "RING_ADASPLASH_COMPILE_AHEAD"
MAX_WORKERS = 16

_dry_run = contextvars.ContextVar("ring_adasplash_dry_run", default=False)
_done: set = set()  # configurations whose kernels were compiled ahead


_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch(kernel, grid):
    """``kernel[grid]``; inside a dry run, a compile-only ``kernel.warmup`` with the same arguments.
    Interpreted, the arguments are checked against the kernel's parameters first: the interpreter
    ignores an unknown keyword, which the compiled launch rejects."""
    if _dry_run.get():
        return functools.partial(kernel.warmup, grid=grid)
    if _INTERPRETED:
        return functools.partial(_checked_launch, kernel, grid)
    return kernel[grid]


LAUNCH_OPTIONS = {"num_warps", "num_stages", "maxnreg"}  # the settings triton_backend gives a launch


def _checked_launch(kernel, grid, *args, **kwargs):
    unknown = sorted(set(kwargs) - set(kernel.arg_names) - LAUNCH_OPTIONS)
    if unknown:
        raise TypeError(f"{kernel.fn.__name__} has no parameter {', '.join(unknown)}")
    return kernel[grid](*args, **kwargs)


class _CompileAndLoad(concurrent.futures.ThreadPoolExecutor):
    """Each compile job also loads its binary on ``device`` and builds its launcher
    (``CompiledKernel.__getitem__`` does both and launches nothing), which is the larger part of a
    cold compile and would otherwise run serially at the first launch."""

    def __init__(self, device: torch.device, workers: int):
        super().__init__(max_workers=workers, thread_name_prefix="ring_adasplash_compile")
        self.device = device

    def submit(self, fn, /, *args, **kwargs):
        def compile_and_load():
            with torch.cuda.device(self.device):
                kernel = fn(*args, **kwargs)
                kernel[(1, 1, 1)]
                return kernel

        return super().submit(compile_and_load)


def enabled() -> bool:
    value = os.environ.get(ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{ENV} must be 0 or 1; got {value!r}")
    return value == "1"


def compile_ahead(key, dry_run: Callable[[], None], device: torch.device) -> None:
    """Run ``dry_run`` once per ``key`` (a configuration: what decides which kernels a call
    compiles) with compile-only launches, on CUDA devices outside a stream capture."""
    if (key in _done or not enabled() or device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"
            or torch.cuda.is_current_stream_capturing()):
        return
    _done.add(key)
    token = _dry_run.set(True)
    try:
        # ignore_errors: a kernel that fails to compile is left out, and its real launch compiles
        # it again and raises there (an error out of the mode's exit would also leave it active)
        with (_CompileAndLoad(device, min(MAX_WORKERS, os.cpu_count() or 1)) as pool,
              triton.AsyncCompileMode(pool, ignore_errors=True)):
            dry_run()
    except Exception as error:  # the real call compiles what is missing, and raises what is wrong
        warnings.warn(f"ring_adasplash: compiling ahead failed, kernels compile at their first launch: {error}")
    finally:
        _dry_run.reset(token)
