"""Device profiles: sensible agent settings for a Raspberry Pi, a laptop, a GPU server.

A profile fills in what the agent's YAML leaves unset — torch device, threads for
training and for HE, batch size, chunk size, and a memory ceiling the agent
keeps under — so one config file works across a mixed fleet. Anything set
explicitly in the YAML wins. ``auto`` detects the class with psutil and the
NVIDIA driver's presence, without importing torch (an idle agent must stay small;
torch's own CUDA check happens when training starts, and falls back to the CPU).
"""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil

ProfileName = Literal["auto", "raspberry-pi", "laptop", "gpu-server"]
KiB = 1024


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    device: Literal["cpu", "cuda"]
    torch_threads: int
    he_threads: int
    batch_size: int
    chunk_size: int
    memory_limit_mb: int
    mixed_precision: bool = False


def _cores(cap: int) -> int:
    return max(1, min(cap, os.cpu_count() or 1))


def profiles() -> dict[str, DeviceProfile]:
    return {
        # Pi 4/5: 4 cores, 1-8 GB; leave a core for the OS and keep MQTT packets small.
        "raspberry-pi": DeviceProfile("raspberry-pi", "cpu", _cores(3), _cores(3), 16, 64 * KiB, 768),
        "laptop": DeviceProfile("laptop", "cpu", _cores(4), _cores(4), 32, 256 * KiB, 2048),
        "gpu-server": DeviceProfile("gpu-server", "cuda", _cores(8), _cores(16), 128, 1024 * KiB, 16384,
                                    mixed_precision=True),
    }


def has_nvidia_gpu() -> bool:
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def detect() -> str:
    """The profile this machine most resembles."""
    if has_nvidia_gpu():
        return "gpu-server"
    arm = platform.machine().lower() in ("aarch64", "armv7l", "armv6l", "arm64")
    small = psutil.virtual_memory().total < 6 * 1024**3
    return "raspberry-pi" if arm and small else "laptop"


def resolve(name: ProfileName) -> DeviceProfile:
    return profiles()[detect() if name == "auto" else name]
