"""`fedmq doctor` and the torch explanation (issue 19: a CUDA-only torch on a
GPU-less Raspberry Pi fails with `libcublasLt… not found`; say what to install)."""

import subprocess
import sys

from fedmq.learning import torch_check

CUDA_ERROR = ("Traceback (most recent call last):\n  ...\nOSError: libcublasLt.so.13: cannot open shared object file: "
              "No such file or directory")


def test_cuda_only_torch_on_a_pi_is_explained(monkeypatch):
    monkeypatch.setattr(torch_check.platform, "machine", lambda: "aarch64")
    text = torch_check.explain(CUDA_ERROR)
    assert "CUDA build" in text and f"pip install torch=={torch_check.PI_TORCH}" in text and "libcublasLt" in text
    monkeypatch.setattr(torch_check.platform, "machine", lambda: "x86_64")
    assert "CPU build" in torch_check.explain(CUDA_ERROR)
    assert "not installed" in torch_check.explain("ModuleNotFoundError: No module named 'torch'")


def test_doctor_passes_here():
    run = subprocess.run([sys.executable, "-m", "fedmq", "doctor"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout
    assert "ok   torch: torch " in run.stdout and run.stdout.strip().endswith("all good")
