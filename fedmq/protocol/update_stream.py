"""Reading a large update straight from its stored chunks, one ciphertext at a time.

Why: an encrypted update is tens of megabytes; joining its chunks into one body and
decoding that body holds it twice more next to the running sum. Here the msgpack
map is walked with a streaming unpacker over the chunks as they come off disk:
once to validate every field but the ciphertexts (which are skipped, only
counted), once more to hand the ciphertexts out one by one to the fold.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator

import msgpack

from fedmq.protocol import wire

Parts = Callable[[], Iterator[bytes]]


class _PartsReader(io.RawIOBase):
    def __init__(self, parts: Iterator[bytes]) -> None:
        self._parts = parts
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            try:
                self._buf = memoryview(next(self._parts))
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _unpacker(parts: Parts, max_object_bytes: int) -> msgpack.Unpacker:
    return msgpack.Unpacker(_PartsReader(parts()), raw=False, strict_map_key=True, use_list=True,
                            max_buffer_size=max_object_bytes)


def read_update(parts: Parts, max_object_bytes: int) -> tuple[wire.Update, int]:
    """The update validated with its ciphertexts left out (an empty list), and how many it has."""
    count = 0
    try:
        unp = _unpacker(parts, max_object_bytes)
        raw: dict = {}
        for _ in range(unp.read_map_header()):
            key = unp.unpack()
            if key == "ciphertexts":
                count = unp.read_array_header()
                for _ in range(count):
                    unp.skip()
                raw[key] = []
            else:
                raw[key] = unp.unpack()
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise wire.WireError(f"malformed update body: {type(exc).__name__}: {exc}") from None
    return wire.validate_body("update", raw), count


def iter_ciphertexts(parts: Parts, max_object_bytes: int) -> Iterator[bytes]:
    try:
        unp = _unpacker(parts, max_object_bytes)
        for _ in range(unp.read_map_header()):
            if unp.unpack() != "ciphertexts":
                unp.skip()
                continue
            for i in range(unp.read_array_header()):
                blob = unp.unpack()
                if not isinstance(blob, bytes):
                    raise wire.WireError(f"ciphertext {i} is a {type(blob).__name__}, expected bytes")
                yield blob
    except wire.WireError:
        raise
    except Exception as exc:
        raise wire.WireError(f"malformed update body: {type(exc).__name__}: {exc}") from None
