"""Is torch usable here — and if not, why, in words an operator can act on.

PyPI's torch 2.11–2.14 wheels for 64-bit ARM are CUDA 13 builds: on a Raspberry Pi
(no CUDA) ``import torch`` fails with ``libcublasLt… not found``. 2.10.0 is the
newest CPU-only aarch64 wheel there. fedmq never pins torch; it explains.
"""

from __future__ import annotations

import platform
import subprocess
import sys

PI_TORCH = "2.10.0"
_CUDA_LIBS = ("libcublas", "libcudnn", "libnccl", "libcudart", "libcusparse", "libnvrtc", "libcufft", "libcurand")


def explain(error: str) -> str:
    """One paragraph for a failed ``import torch``."""
    if any(lib in error for lib in _CUDA_LIBS):
        arm = platform.machine() in ("aarch64", "arm64")
        return ("the installed torch is a CUDA build, and this machine has no CUDA libraries "
                f"({error.strip().splitlines()[-1][:160]}). "
                + (f"On a Raspberry Pi or another 64-bit ARM board without CUDA: pip install torch=={PI_TORCH} "
                   "(the newest CPU-only aarch64 wheel on PyPI); on a Jetson, NVIDIA's JetPack torch."
                   if arm else "Install the CPU build (pip install torch --index-url "
                   "https://download.pytorch.org/whl/cpu) or the CUDA toolkit this build needs."))
    if "No module named 'torch'" in error:
        return ("torch is not installed: pip install torch (on a Raspberry Pi: "
                f"pip install torch=={PI_TORCH}); fedmq does not pin it, so each device gets its own build")
    return f"import torch failed: {error.strip().splitlines()[-1][:300] if error.strip() else 'unknown error'}"


def check() -> tuple[bool, str]:
    """Import torch in a child process (a broken build must not take this one down)."""
    code = "import torch; print(torch.__version__, torch.cuda.is_available())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if run.returncode == 0:
        version, cuda = run.stdout.split()
        return True, f"torch {version} ({'CUDA available' if cuda == 'True' else 'CPU'})"
    return False, explain(run.stderr)
