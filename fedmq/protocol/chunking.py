"""Splitting message bodies into chunks and putting them back together.

Chunks are idempotent: QoS 1 may deliver one twice, so a duplicate is rejected
(and logged by the caller) without harming the stream. A stream completes only
when every chunk is present and the SHA-256 of the joined body equals the digest
every chunk carried; otherwise it is discarded whole, never half-used.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmq import PROTOCOL_VERSION
from fedmq.privacy import signing
from fedmq.protocol.wire import Envelope, WireError, digest

StreamKey = tuple[str, int, str]  # kind, round, sender
MAX_STREAMS_PER_SENDER = 4


def split(kind: str, task: str, rnd: int, sender: str, body: bytes, chunk_size: int,
          signing_key: Ed25519PrivateKey | None = None) -> list[Envelope]:
    """Cut ``body`` into envelopes of at most ``chunk_size`` payload bytes; with a
    ``signing_key`` every chunk carries the stream's signature."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    whole = digest(body)
    pieces = [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)] or [b""]
    now = time.time()
    sig = signing.sign(signing_key, PROTOCOL_VERSION, kind, task, rnd, sender, whole) if signing_key else b""
    return [
        Envelope(kind=kind, task=task, round=rnd, sender=sender, seq=i, total=len(pieces),
                 digest=whole, body=piece, ts=now, sig=sig)
        for i, piece in enumerate(pieces)
    ]


def single(msg: object, *, task: str, rnd: int, sender: str,
           signing_key: Ed25519PrivateKey | None = None) -> Envelope:
    """A small message as a stream of exactly one chunk."""
    from fedmq.protocol.wire import encode_body

    kind, body = encode_body(msg)
    return split(kind, task, rnd, sender, body, max(len(body), 1), signing_key)[0]


class PartStore(Protocol):
    """Where the chunks of unfinished streams wait. In memory by default; the
    aggregator keeps them on disk (SQLite) so that fifty concurrent uploads cost it
    O(model) memory, not O(clients x model), and survive a ``kill -9``."""

    def put(self, env: Envelope) -> None: ...

    def bodies(self, key: StreamKey, digest: bytes) -> Iterator[bytes]:
        """The stream's chunk bodies in ``seq`` order."""
        ...

    def drop(self, key: StreamKey, digest: bytes) -> None:
        """Forget a stream that was discarded (evicted, oversize, corrupt)."""
        ...

    def completed(self, key: StreamKey, digest: bytes) -> None:
        """A stream was handed out whole; a durable store may keep its parts until
        the caller has committed what it did with them."""
        ...


class MemoryParts:
    def __init__(self) -> None:
        self._parts: dict[tuple[StreamKey, bytes], dict[int, bytes]] = {}

    def put(self, env: Envelope) -> None:
        self._parts.setdefault(((env.kind, env.round, env.sender), env.digest), {})[env.seq] = env.body

    def bodies(self, key: StreamKey, digest: bytes) -> Iterator[bytes]:
        parts = self._parts.get((key, digest), {})
        return (parts[i] for i in sorted(parts))

    def drop(self, key: StreamKey, digest: bytes) -> None:
        self._parts.pop((key, digest), None)

    completed = drop


@dataclass
class _Stream:
    digest: bytes
    total: int
    seqs: set[int] = field(default_factory=set)
    size: int = 0
    started: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Completed:
    kind: str
    round: int
    sender: str
    body: bytes | bytearray | None  # None when the reassembler does not assemble: use ``parts``
    envelope: Envelope  # the last chunk, for its metadata
    size: int = 0
    parts: Callable[[], Iterator[bytes]] | None = None  # the chunk bodies in order, read again on each call


class Reassembler:
    """Collects chunk streams keyed by (kind, round, sender) and digest.

    A sender may have a few streams in progress per kind and round (a restarted
    upload carries a new digest); the oldest is evicted beyond
    ``MAX_STREAMS_PER_SENDER``. Keying by digest means a forged or corrupted chunk
    starts a stream of its own and can never poison or evict a genuine upload.
    The first stream to complete wins; the sender's other partial streams for that
    kind and round are dropped (partial uploads never count). Only bookkeeping
    lives here; the chunk bodies live in the ``parts`` store.
    """

    def __init__(self, *, max_stream_bytes: int, max_streams: int = 10_000,
                 parts: PartStore | None = None, assemble: bool = True, min_chunk: int = 1) -> None:
        """``assemble=False``: a completed stream is checked against its digest chunk by
        chunk and handed out as ``Completed.parts`` instead of one joined body.
        ``min_chunk``: every chunk but the last carries at least this many bytes, so a
        stream's ``total`` is bounded by ``max_stream_bytes / min_chunk`` — a 1-byte
        chunk cannot announce a million-chunk stream."""
        self.assemble = assemble
        self.min_chunk = min_chunk
        self.max_stream_bytes = max_stream_bytes
        self.max_streams = max_streams
        self.parts: PartStore = parts if parts is not None else MemoryParts()
        self._streams: dict[tuple[StreamKey, bytes], _Stream] = {}
        self._done: dict[StreamKey, bytes] = {}

    def add(self, env: Envelope, *, stored: bool = False) -> Completed | None:
        """Add one chunk; returns the whole body when this chunk completes it.

        ``stored``: the chunk is already in the part store (a restart re-reading it).
        Raises WireError for a chunk that must be rejected; the streams of other
        senders are untouched by any rejection.
        """
        key: StreamKey = (env.kind, env.round, env.sender)
        if self._done.get(key) == env.digest:
            raise WireError(f"duplicate chunk {env.seq}/{env.total}: stream already complete")
        if env.seq < env.total - 1:
            if len(env.body) < self.min_chunk:
                raise WireError(f"chunk {env.seq}/{env.total} carries {len(env.body)} bytes; every chunk but "
                                f"the last carries at least {self.min_chunk}")
            if (env.total - 1) * len(env.body) > self.max_stream_bytes:
                raise WireError(f"{env.total} chunks of {len(env.body)} bytes exceed the "
                                f"{self.max_stream_bytes}-byte limit on a stream")
        elif (env.total - 1) * self.min_chunk > self.max_stream_bytes:
            raise WireError(f"a stream of {env.total} chunks exceeds the {self.max_stream_bytes}-byte limit")
        skey = (key, env.digest)
        stream = self._streams.get(skey)
        if stream is None:
            siblings = [k for k in self._streams if k[0] == key]
            if len(siblings) >= MAX_STREAMS_PER_SENDER:
                self._forget(siblings[0])  # dicts keep insertion order: oldest first
            if len(self._streams) >= self.max_streams:
                raise WireError(f"too many streams in progress ({self.max_streams})")
            stream = self._streams[skey] = _Stream(digest=env.digest, total=env.total)
        if env.total != stream.total:
            raise WireError(f"chunk says total {env.total}, stream has total {stream.total}")
        if env.seq in stream.seqs:
            raise WireError(f"duplicate chunk {env.seq}/{env.total}")
        if stream.size + len(env.body) > self.max_stream_bytes:
            self._forget(skey)
            raise WireError(f"stream exceeds {self.max_stream_bytes} bytes: discarded")
        if not stored:
            self.parts.put(env)
        stream.seqs.add(env.seq)
        stream.size += len(env.body)
        if len(stream.seqs) < stream.total:
            return None
        if self.assemble:
            body: bytearray | None = bytearray(stream.size)  # filled in place: one copy, not two
            pos = 0
            for part in self.parts.bodies(key, stream.digest):
                body[pos:pos + len(part)] = part
                pos += len(part)
            ok = pos == stream.size and digest(body) == stream.digest
        else:
            body, h, pos = None, hashlib.sha256(), 0
            for part in self.parts.bodies(key, stream.digest):
                h.update(part)
                pos += len(part)
            ok = pos == stream.size and h.digest() == stream.digest
        if not ok:
            self._forget(skey)
            raise WireError("digest mismatch on the reassembled body: stream discarded")
        del self._streams[skey]
        self.parts.completed(key, stream.digest)
        for other in [k for k in self._streams if k[0] == key]:
            self._forget(other)
        self._done[key] = stream.digest
        store, sdigest = self.parts, stream.digest
        return Completed(env.kind, env.round, env.sender, body, env, stream.size,
                         lambda: store.bodies(key, sdigest))

    def _forget(self, skey: tuple[StreamKey, bytes]) -> None:
        del self._streams[skey]
        self.parts.drop(*skey)

    def missing(self, kind: str, rnd: int, sender: str) -> list[int] | None:
        """Chunk numbers still lacking in a stream in progress (None if no such stream)."""
        streams = [st for k, st in self._streams.items() if k[0] == (kind, rnd, sender)]
        if not streams:
            return None
        stream = streams[-1]
        return [i for i in range(stream.total) if i not in stream.seqs]

    def discard(self, keep: Callable[[StreamKey], bool]) -> int:
        """Drop streams (in progress or remembered as done) for which ``keep`` is false."""
        dropped = [k for k in self._streams if not keep(k[0])]
        for k in dropped:
            self._forget(k)
        for k in [k for k in self._done if not keep(k)]:
            del self._done[k]
        return len(dropped)

    def pending(self) -> list[StreamKey]:
        return [k for k, _ in self._streams]
