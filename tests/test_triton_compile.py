"""The Triton kernels compile for a Hopper GPU (sm_90) on a machine without one: every
specialization a call launches (forward and backward; alpha 1.5, 2, another and one per head;
both schedules; bf16 and fp32; a window, sinks and key padding), with the arguments of an
interpreted run, compiled to a cubin by Triton's own ptxas (``offline_compile.py``). This checks
what the interpreter does not: types, layouts and control flow as the compiler sees them."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)


def _ptxas_available() -> bool:
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas"))


# one process compiles some 150 specializations one after another: on a CI machine of two cores,
# shared with another test worker, 10 to 15 minutes with the capture
COMPILE_TIMEOUT_S = 1200


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend (with ptxas) is not installed")
@pytest.mark.timeout(2 * COMPILE_TIMEOUT_S)
def test_every_launched_kernel_compiles_for_sm90(tmp_path):
    script = os.path.join(HERE, "offline_compile.py")
    record = str(tmp_path / "launches.pkl")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RING_ADASPLASH_BACKEND")}
    subprocess.run([sys.executable, script, "capture", record], check=True, timeout=COMPILE_TIMEOUT_S,
                   env=env | {"TRITON_INTERPRET": "1", "RING_ADASPLASH_BACKEND": "triton"})
    result = subprocess.run([sys.executable, script, "compile", record], capture_output=True, text=True,
                            timeout=COMPILE_TIMEOUT_S, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    compiled = int(next(line for line in lines if line.startswith("compiled")).split()[1])
    failed = [line for line in lines if line.startswith("FAILED")]
    assert not failed, "\n".join(failed)
    assert compiled >= 30, result.stdout  # ten kernels, several specializations each
