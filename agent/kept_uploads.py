"""The agent's uploads kept on disk until their round's result arrives.

Why on disk: the aggregator may ask for chunks it lacks after its own restart or
our reconnect — and after *our* restart too (SIGTERM while the broker is down, a
reboot): a kept upload must outlive the process. One 0600 file per round in the
state directory, named by round and chunk size so a resend cuts the same chunks.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from fedmq.runtime.private_files import ensure_private_dir, write_private

log = logging.getLogger("fedmq.agent")
_NAME = re.compile(r"^round-(\d+)\.cs(\d+)\.update$")


class KeptUploads:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "uploads"

    def _files(self) -> dict[int, tuple[Path, int]]:
        if not self.dir.exists():
            return {}
        found = {}
        for path in self.dir.iterdir():
            m = _NAME.match(path.name)
            if m:
                found[int(m.group(1))] = (path, int(m.group(2)))
        return found

    def put(self, rnd: int, body: bytes, chunk_size: int) -> None:
        ensure_private_dir(self.dir)
        self.drop(rnd)
        write_private(self.dir / f"round-{rnd}.cs{chunk_size}.update", body)

    def get(self, rnd: int) -> tuple[tuple[str, bytes], int] | None:
        """(kind, body) as ``wire.encode_body`` returns it, and the chunk size; None if not kept."""
        entry = self._files().get(rnd)
        if entry is None:
            return None
        path, chunk_size = entry
        try:
            return ("update", path.read_bytes()), chunk_size
        except OSError as exc:
            log.warning("kept upload %s unreadable: %s", path, exc)
            return None

    def rounds(self) -> list[int]:
        return sorted(self._files())

    def drop(self, rnd: int) -> bool:
        entry = self._files().get(rnd)
        if entry is None:
            return False
        entry[0].unlink(missing_ok=True)
        return True

    def drop_before(self, rnd: int) -> None:
        for r, (path, _) in self._files().items():
            if r < rnd:
                path.unlink(missing_ok=True)
