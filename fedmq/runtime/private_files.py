"""Writing secrets to disk: owner-only, atomically, never world-readable."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` owner-only. An existing directory keeps its mode: a
    ``state_dir`` of ``.`` or ``/var/lib`` is somebody else's to set, and every
    secret inside it is written 0600 on its own."""
    if not path.exists():
        path.mkdir(parents=True, mode=0o700)
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` with mode 0600 via write + fsync + rename, so a crash leaves
    either the old file or the new one, and no reader ever sees a world-readable copy."""
    ensure_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def is_private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0
