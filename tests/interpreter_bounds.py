"""A bounds check for Triton's interpreter, installed for the whole test session by ``conftest.py``.

Every load, store and atomic add that an interpreted kernel makes where its mask is set must fall
inside the storage of one of the tensors its launch was given; else the access raises
``OutOfBounds`` naming the kernel, the kind of access and the offending addresses. On a GPU such
an access reads or overwrites other memory without a word (or faults in a later launch); the
interpreter runs the same addresses through NumPy on raw pointers, where it may corrupt the
process's heap just as silently. Checked against storages rather than the tensors' own extents:
a kernel may read a view's base (the strided Q, K, V of a (B, S, H, D) tensor), never past it.
"""
from __future__ import annotations

import numpy as np


class OutOfBounds(RuntimeError):
    """An interpreted kernel touched memory outside every tensor of its launch."""


_RANGES: list = []  # (first byte, one past the last byte) of each tensor storage of the running launch
_KERNEL = {"name": "?"}


def _check(ptrs, mask, itemsize: int, kind: str) -> None:
    addresses = np.asarray(ptrs.data)
    if mask is not None:
        addresses = addresses[np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)]
    addresses = addresses.astype(np.uint64).ravel()
    if addresses.size == 0:
        return
    inside = np.zeros(addresses.shape, dtype=bool)
    for first, end in _RANGES:
        inside |= (addresses >= first) & (addresses + itemsize <= end)
    if not inside.all():
        outside = addresses[~inside][:4]
        raise OutOfBounds(f"{_KERNEL['name']}: {kind} of {int((~inside).sum())} element(s) outside every tensor of "
                          f"its launch, e.g. at {[hex(int(a)) for a in outside]}; the tensors span "
                          f"{[(hex(a), hex(b)) for a, b in _RANGES]}")


def install() -> bool:
    """Wraps the interpreter's launch (to record the storages of its tensors) and its memory
    operations (to check each against them). True once installed; False where this Triton's
    interpreter lacks the methods wrapped (a version whose interpreter differs: nothing checked)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    executor, builder = getattr(interpreter, "GridExecutor", None), getattr(interpreter, "InterpreterBuilder", None)
    names = ("create_masked_load", "create_masked_store", "create_atomic_rmw")
    if executor is None or builder is None or not hasattr(executor, "_init_args_hst") or \
            not hasattr(interpreter, "_get_np_dtype") or not all(hasattr(builder, name) for name in names):
        return False
    if getattr(builder, "_bounds_checked", False):
        return True
    element_size = interpreter._get_np_dtype

    init_args = executor._init_args_hst

    def recording_init(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        _RANGES.clear()
        for value in list(args_hst) + list(kwargs_hst.values()):
            if hasattr(value, "untyped_storage"):
                storage = value.untyped_storage()
                _RANGES.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
        _KERNEL["name"] = getattr(self.fn, "__name__", repr(self.fn))
        return args_hst, kwargs_hst

    load, store, atomic = (getattr(builder, name) for name in names)

    def checked_load(self, ptrs, mask, *args, **kwargs):
        _check(ptrs, mask, np.dtype(element_size(ptrs.get_element_ty())).itemsize, "load")
        return load(self, ptrs, mask, *args, **kwargs)

    def checked_store(self, ptrs, value, mask, *args, **kwargs):
        _check(ptrs, mask, np.asarray(value.data).dtype.itemsize, "store")
        return store(self, ptrs, value, mask, *args, **kwargs)

    def checked_atomic(self, op, ptrs, value, mask, *args, **kwargs):
        _check(ptrs, mask, np.asarray(value.data).dtype.itemsize, "atomic")
        return atomic(self, op, ptrs, value, mask, *args, **kwargs)

    executor._init_args_hst = recording_init
    builder.create_masked_load, builder.create_masked_store = checked_load, checked_store
    builder.create_atomic_rmw = checked_atomic
    builder._bounds_checked = True
    return True
