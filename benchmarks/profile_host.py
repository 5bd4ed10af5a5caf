"""Where the host's time goes in one fwd+bwd of our attention: the float alpha 1.5, a learnable
per-head tensor of 1.5 as a ``DeviceAlpha`` and as a plain tensor, alphas 1.2 to 2.0 as a
``DeviceAlpha`` (scattered 8K, 16 heads, D 64, bf16), run from the repository root:

    python3 benchmarks/profile_host.py

For each, in this order: the synchronizing ops of one call (``torch.cuda.set_sync_debug_mode``,
a prototype that does not see every one), the host ms per call (20 calls issued from an idle
device, no wait: above the device time, the host bounds the call), cProfile's costliest
functions over 20 calls, and ``torch.profiler``'s CPU table (runtime calls and aten ops by self
CPU time) over 10.
"""
import cProfile, pstats, io, sys, time
import torch
sys.path.insert(0, "benchmarks")
import bench_kernels, common
from inputs import make_qkv

q, k, v = make_qkv("scattered", 1, 8192, 16, 64, 1.0, dtype=torch.bfloat16, device="cuda")
for name, spec, dev in (("float", "none", False), ("DeviceAlpha same", "same", True), ("plain same", "same", False),
                        ("DeviceAlpha mixed", "1.2:2.0", True)):
    common.HEAD_ALPHAS = common.head_alphas(spec, 1.5, 16)
    common.DEVICE_ALPHA = dev
    step = bench_kernels.make_step("ours", "fwdbwd", q, k, v)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        step()
        torch.cuda.set_sync_debug_mode(0)
    print(f"\n===== {name}: synchronizing ops in one call: {len(caught)}")
    for w in caught[:5]:
        print("   ", str(w.message)[:300])
    torch.cuda.synchronize()
    # host time with the device kept far ahead: issue 20 calls, no sync
    t = time.perf_counter()
    for _ in range(20):
        step()
    issued = (time.perf_counter() - t) / 20 * 1e3
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(20):
        step()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    st.sort_stats("tottime").print_stats(28)
    print(f"\n===== {name}: host ms per call {issued:.3f} =====")
    print("\n".join(s.getvalue().splitlines()[:50]))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
