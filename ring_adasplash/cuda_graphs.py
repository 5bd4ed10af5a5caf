"""CUDA graphs for the single-device forward at short sequences.

At 8K tokens the forward issues some fifty kernels, most of them small; the CPU takes longer to
issue them than the GPU takes to run them, so the GPU waits. A CUDA graph issues the whole
forward at once. No pass reads a tensor's value on the host (every size comes from shapes), so
one graph serves every call with the same key. The backward is not graphed: its few large kernels
hide their own launches, and copying its eight inputs into a graph's buffers cost more than the
graph saved (docs/design.md: launch overhead).

Policy: a call whose key (op, shapes, strides, dtypes, scalars, current stream, and the
visibility vectors themselves) is seen for the second time is captured; later calls replay. A
replay copies the inputs into the graph's own input buffers and clones its outputs, so a result
never aliases a later call's (a training step runs the same shape in every layer before any
backward). Graphs of one stream share one memory pool: replays on a stream run one after another
and every output is cloned before the next, so no graph reads what another wrote.

``RING_ADASPLASH_CUDA_GRAPHS``: ``auto`` (default: graphs when batch * heads_q * seqlen_q *
seqlen_k <= ``AUTO_MAX_WORK``; for packed documents, heads_q times the sum over documents of
their query x key lengths), ``on`` (every CUDA call) or ``off``. Calls stay eager while
telemetry records, while the current stream is itself being captured (a model under
``torch.compile(mode="reduce-overhead")`` or the user's own graph), and on CPU tensors.
"""
from __future__ import annotations

import collections
import os
import warnings
from typing import Callable

import torch

from . import telemetry
from .kernels.identity import tensor_identity

MODE_ENV = "RING_ADASPLASH_CUDA_GRAPHS"
MODES = ("auto", "on", "off")
# up to about 8K tokens with 16 heads the eager forward waits on the CPU; from 16K the graph's input
# copies cost about what it saves (why: docs/design.md, launch overhead)
AUTO_MAX_WORK = 2**31
MAX_GRAPHS = 16  # captured graphs kept (least recently used dropped first)
_SEEN_LIMIT = 256  # keys remembered for the capture-on-second-sight policy

_graphs: collections.OrderedDict = collections.OrderedDict()  # key -> _Graph, or None where capture failed
_seen: collections.OrderedDict = collections.OrderedDict()
_pools: dict = {}  # (device, stream) -> memory pool handle


def mode() -> str:
    value = os.environ.get(MODE_ENV, "auto")
    if value not in MODES:
        raise ValueError(f"{MODE_ENV} must be one of {', '.join(MODES)}; got {value!r}")
    return value


def _wanted(q: torch.Tensor, work: int) -> bool:
    choice = mode()
    if choice == "off" or not q.is_cuda or telemetry.enabled() or torch.cuda.is_current_stream_capturing():
        return False
    return choice == "on" or work <= AUTO_MAX_WORK


def _key(name: str, args: tuple, copied: int, stream) -> tuple:
    parts = [name, stream.cuda_stream]
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            # held tensors enter the graph by address: the key names that memory and its version
            parts.append((tuple(a.shape), a.stride(), a.dtype, a.device) if i < copied else tensor_identity(a))
        else:
            parts.append(a)
    return tuple(parts)


class _Graph:
    """One captured call: input buffers for the first ``copied`` args (the rest are held, and read
    in place), the graph, and its outputs."""

    def __init__(self, fn: Callable, args: tuple, copied: int, pool):
        self.inputs = [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device) for a in args[:copied]]
        for buffer, a in zip(self.inputs, args):
            buffer.copy_(a)
        self.held = args[copied:]
        from .kernels import triton_backend

        # the launchers' remembered tensors (visibility ranges, per-head constants) enter the graph
        # by address too: held here, their memory stays the graph's after the caches drop them
        self.remembered = triton_backend.remembered()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn(*self.inputs, *self.held)

    def __call__(self, args: tuple) -> tuple:
        for buffer, a in zip(self.inputs, args):  # the first len(self.inputs) args
            buffer.copy_(a)
        self.graph.replay()
        return tuple(o.clone() for o in self.outputs)


def call(name: str, fn: Callable, args: tuple, copied: int, work: int) -> tuple:
    """``fn(*args)`` (a tuple of tensors out), eager or through a graph. ``args[:copied]`` are
    tensors copied into the graph on every replay; later tensor args (the visibility vectors) are
    read in place, by address; other args (the scale, what of alpha the graph holds fixed) are
    constants of the graph. All of them are in the key: two calls whose args give one key must
    make the same graph (``fn`` is called at the capture only)."""
    q = args[0]
    if not _wanted(q, work):
        return fn(*args)
    stream = torch.cuda.current_stream(q.device)
    key = _key(name, args, copied, stream)
    if key in _graphs:
        _graphs.move_to_end(key)
        graph = _graphs[key]
        return fn(*args) if graph is None else graph(args)
    if key not in _seen:  # first sight: eager (this also compiles and loads every kernel the graph needs)
        _seen[key] = None
        if len(_seen) > _SEEN_LIMIT:
            _seen.popitem(last=False)
        return fn(*args)
    pool = _pools.setdefault((q.device, stream.cuda_stream), torch.cuda.graph_pool_handle())
    try:
        graph = _Graph(fn, args, copied, pool)
    except RuntimeError as error:  # stay eager for this key, and say why once
        warnings.warn(f"ring_adasplash: CUDA graph capture of {name} failed, running eagerly: {error}")
        graph = None
    _graphs[key] = graph
    if len(_graphs) > MAX_GRAPHS:
        _graphs.popitem(last=False)
    return fn(*args) if graph is None else graph(args)


def clear() -> None:
    """Drop every captured graph (their memory returns to PyTorch's allocator)."""
    _graphs.clear()
    _seen.clear()
    _pools.clear()
