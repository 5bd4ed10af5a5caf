"""Compile the Triton kernels for a GPU that is not there: ``capture`` runs calls under Triton's
interpreter and records every launch's arguments; ``compile_all`` (in a process without
``TRITON_INTERPRET``) compiles each recorded specialization for ``cuda`` sm_90 with Triton's own
ptxas. Run by ``test_triton_compile.py`` as two subprocesses:

    TRITON_INTERPRET=1 python3 tests/offline_compile.py capture PATH
    python3 tests/offline_compile.py compile PATH
"""
import contextlib
import importlib
import inspect
import os
import pickle
import sys

TYPES = {"torch.bfloat16": "*bf16", "torch.float32": "*fp32", "torch.float16": "*fp16", "torch.int32": "*i32",
         "torch.int8": "*i8", "torch.int16": "*i16", "torch.uint8": "*u8", "torch.float64": "*fp64",
         "torch.bool": "*i1", "torch.int64": "*i64"}
SM90_SHARED_BYTES = 232448  # shared memory one block may use on an H100 or H200


@contextlib.contextmanager
def recorded_launches(skip=lambda: False):
    """Within the block, every launch through the kernel modules' ``launch`` (``triton_backend``'s
    and ``triton_tiles``') is recorded into the dict yielded: {(kernel module, name): [arguments by
    name, as (kind, value)]} (a tensor's value: its dtype and whether its address is a multiple of
    16). Where ``skip()`` is true the kernel is recorded and not run, as a compile-ahead dry run
    launches it."""
    import torch

    from ring_adasplash.kernels import triton_backend, triton_tiles

    launched = {}
    modules = (triton_backend, triton_tiles)
    launches = [module.launch for module in modules]

    def recording(launch):
        def launcher(kernel, grid):
            def call(**kwargs):
                described = {}
                for name, value in kwargs.items():
                    if torch.is_tensor(value):
                        described[name] = ("tensor", (str(value.dtype), value.data_ptr() % 16 == 0))
                    elif isinstance(value, bool) or not isinstance(value, (int, float)):
                        described[name] = ("const", value)
                    else:
                        described[name] = ("int" if isinstance(value, int) else "float", value)
                launched.setdefault((kernel.fn.__module__, kernel.fn.__name__), []).append(described)
                if not skip():
                    return launch(kernel, grid)(**kwargs)

            return call

        return launcher

    for module, launch in zip(modules, launches):
        module.launch = recording(launch)
    try:
        yield launched
    finally:
        for module, launch in zip(modules, launches):
            module.launch = launch


def specialization(kernel, arguments: dict) -> tuple[dict, dict, dict, dict]:
    """``(signature, constexprs, attrs, options)`` of a launch of ``kernel`` with ``arguments`` (as
    ``recorded_launches`` describes them), specialized as Triton's launcher does on the GPU:
    integers equal to 1 are constants, addresses and integers that are multiples of 16 are marked so
    (vector loads, and with them the pipelined copies that fill shared memory); ``options``: the
    launch settings (``compile_ahead.LAUNCH_OPTIONS``)."""
    from ring_adasplash.kernels.compile_ahead import LAUNCH_OPTIONS

    options = {key: arguments[key][1] for key in sorted(LAUNCH_OPTIONS) if key in arguments}
    signature, constexprs, attrs = {}, {}, {}
    for index, (param, declared) in enumerate(inspect.signature(kernel.fn).parameters.items()):
        kind, value = arguments[param]
        if param == "PRECISION" and value == "f32":
            value = "native"  # the interpreter's stand-in for 16-bit products (triton_common)
        if "constexpr" in str(declared.annotation) or kind == "const":
            signature[param], constexprs[(index,)] = "constexpr", value
        elif kind == "tensor":
            signature[param] = TYPES[value[0]]
            if value[1]:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif kind == "int" and value == 1:
            signature[param], constexprs[(index,)] = "constexpr", 1
        else:
            signature[param] = ("i32" if abs(value) < 2**31 else "i64") if kind == "int" else "fp32"
            if kind == "int" and value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs, options


def specialization_key(kernel, arguments: dict) -> tuple:
    """``specialization`` as one hashable value: two launches with the same key run one binary."""
    return (kernel.fn.__name__, *(str(sorted(part.items())) for part in specialization(kernel, arguments)))


def capture(path: str) -> None:
    """Forward and backward at alpha 1.5, 2, 1.3, 1.1 and one per head (1.3 and 1.7: the kernels
    read alpha per head; 1.1 and 1.7: their powers' log2 chosen per head), bf16 and fp32, causal
    with a window and sinks and with key padding; the forwards of both schedules; the Newton step
    of a ring; a learnable alpha's backward, of a ``DeviceAlpha`` too; head dim
    256; entmax over tensors; writes what ``recorded_launches`` records to ``path``."""
    import torch

    import ring_adasplash as ra
    from ring_adasplash.kernels import triton_backend

    with recorded_launches() as launched:
        _capture_calls(ra, triton_backend, torch)
    with open(path, "wb") as f:
        pickle.dump(launched, f)


def _capture_calls(ra, triton_backend, torch) -> None:
    """The calls ``capture`` records."""
    for dtype in (torch.bfloat16, torch.float32):
        for alpha in (1.5, 2.0, 1.3, 1.1, torch.tensor([1.3, 1.7]), torch.tensor([1.1, 1.7])):
            q, k, v = (torch.randn(2, 130, 2, 64).to(dtype).requires_grad_() for _ in range(3))
            keep = torch.ones(2, 130, dtype=torch.bool)
            keep[1, :20] = False
            out = ra.adasplash_func(q, k, v, alpha=alpha, window_size=(40, 0), sink_tokens=2, key_padding_mask=keep)
            out.float().sum().backward()
    # both schedules as forwards alone (nothing requires grad: the output kernel without the
    # backward's sums): the Newton schedule (one device's), and the histogram schedule (a ring's:
    # histogram, fine histogram and Newton passes, the tau kernels)
    for schedule, alphas in (("newton", (1.5, 1.3)), ("histogram", (1.5, 2.0, 1.3))):
        os.environ["RING_ADASPLASH_SCHEDULE"] = schedule
        for dtype in (torch.bfloat16, torch.float32):
            for alpha in (*alphas, torch.tensor([1.3, 1.7])):
                q, k, v = (torch.randn(1, 130, 2, 64).to(dtype) for _ in range(3))
                ra.adasplash_func(q, k, v, alpha=alpha)
    del os.environ["RING_ADASPLASH_SCHEDULE"]
    # the Newton step between the passes of several key blocks (a ring), one alpha and one per head
    from ring_adasplash.kernels import EntmaxSpec
    from ring_adasplash.kernels import stats as S

    for alpha in (1.3, (1.3, 1.7)):
        start = S.NewtonState.of(torch.zeros(1, 2, 130), torch.zeros(1, 2, 130), torch.ones(1, 2, 130),
                                 torch.zeros(1, 2, 130, dtype=torch.bool))
        triton_backend.newton_step(start, torch.ones(1, 2, 130, 3, dtype=torch.float64), EntmaxSpec(alpha), 1e-6,
                                   1e-6)
    # a learnable alpha: the dQ kernel's sums of dL/dalpha (their log is inline PTX on the GPU)
    q, k, v = (torch.randn(1, 130, 2, 64).to(torch.bfloat16).requires_grad_() for _ in range(3))
    for alpha in (torch.full((2,), 1.5, requires_grad=True), ra.DeviceAlpha(torch.full((2,), 1.5, requires_grad=True))):
        ra.adasplash_func(q, k, v, alpha=alpha).float().sum().backward()
    # the largest head dim, whose tiles fill the most shared memory (forward and backward)
    q, k, v = (torch.randn(1, 130, 1, 256).to(torch.bfloat16).requires_grad_() for _ in range(3))
    ra.adasplash_func(q, k, v, alpha=1.5).float().sum().backward()
    for alpha in (1.5, 2.0, 1.3):
        for dtype in (torch.bfloat16, torch.float32):
            ra.entmax(torch.randn(3, 100).to(dtype), alpha)
        triton_backend.entmax_rows(torch.randn(2, 100), alpha, row_block=32)


def compile_all(path: str, on_binary=None) -> tuple[int, list]:
    """Compiles every distinct recorded specialization; returns (compiled, failures).
    ``on_binary(kernel name, compiled kernel)``, where given, is called with each one."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    with open(path, "rb") as f:
        launched = pickle.load(f)
    compiled, failures, done = 0, [], set()
    for (module, name), calls in launched.items():
        kernel = getattr(importlib.import_module(module), name)
        for arguments in calls:
            key = specialization_key(kernel, arguments)
            if key in done:
                continue
            done.add(key)
            signature, constexprs, attrs, options = specialization(kernel, arguments)
            try:
                binary = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                                        target=GPUTarget("cuda", 90, 32), options=options)
                compiled += 1
            except Exception as error:  # noqa: BLE001 - every failure is reported by the test
                failures.append(f"{name}: {type(error).__name__}: {str(error)[-1500:]}")
                continue
            if on_binary is not None:
                on_binary(name, binary)
            if binary.metadata.shared > SM90_SHARED_BYTES:  # the launch would fail on the GPU
                failures.append(f"{name}: {binary.metadata.shared} bytes of shared memory, more than an sm_90 "
                                f"block may use ({SM90_SHARED_BYTES}); constexprs {constexprs}")
    return compiled, failures


if __name__ == "__main__":
    step, target = sys.argv[1], sys.argv[2]
    if step == "capture":
        assert os.environ.get("TRITON_INTERPRET") == "1"
        capture(target)
    else:
        compiled, failures = compile_all(target)
        print(f"compiled {compiled}")
        for failure in failures:
            print("FAILED", failure)
