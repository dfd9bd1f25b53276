"""Splitting message bodies into chunks and putting them back together.

Chunks are idempotent: QoS 1 may deliver one twice, so a duplicate is rejected
(and logged by the caller) without harming the stream. A stream completes only
when every chunk is present and the SHA-256 of the joined body equals the digest
every chunk carried; otherwise it is discarded whole, never half-used.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fedmq.wire import Envelope, WireError, digest

StreamKey = tuple[str, int, str]  # kind, round, sender
MAX_STREAMS_PER_SENDER = 4


def split(kind: str, task: str, rnd: int, sender: str, body: bytes, chunk_size: int) -> list[Envelope]:
    """Cut ``body`` into envelopes of at most ``chunk_size`` payload bytes."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    whole = digest(body)
    pieces = [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)] or [b""]
    now = time.time()
    return [
        Envelope(kind=kind, task=task, round=rnd, sender=sender, seq=i, total=len(pieces),
                 digest=whole, body=piece, ts=now)
        for i, piece in enumerate(pieces)
    ]


def single(msg: object, *, task: str, rnd: int, sender: str) -> Envelope:
    """A small message as a stream of exactly one chunk."""
    from fedmq.wire import encode_body

    kind, body = encode_body(msg)
    return split(kind, task, rnd, sender, body, max(len(body), 1))[0]


@dataclass
class _Stream:
    digest: bytes
    total: int
    parts: dict[int, bytes] = field(default_factory=dict)
    size: int = 0
    started: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Completed:
    kind: str
    round: int
    sender: str
    body: bytes
    envelope: Envelope  # the last chunk, for its metadata


class Reassembler:
    """Collects chunk streams keyed by (kind, round, sender) and digest.

    A sender may have a few streams in progress per kind and round (a restarted
    upload carries a new digest); the oldest is evicted beyond
    ``MAX_STREAMS_PER_SENDER``. Keying by digest means a forged or corrupted chunk
    starts a stream of its own and can never poison or evict a genuine upload.
    The first stream to complete wins; the sender's other partial streams for that
    kind and round are dropped (partial uploads never count).
    """

    def __init__(self, *, max_stream_bytes: int, max_streams: int = 10_000) -> None:
        self.max_stream_bytes = max_stream_bytes
        self.max_streams = max_streams
        self._streams: dict[tuple[StreamKey, bytes], _Stream] = {}
        self._done: dict[StreamKey, bytes] = {}

    def add(self, env: Envelope) -> Completed | None:
        """Add one chunk; returns the whole body when this chunk completes it.

        Raises WireError for a chunk that must be rejected; the streams of other
        senders are untouched by any rejection.
        """
        key: StreamKey = (env.kind, env.round, env.sender)
        if self._done.get(key) == env.digest:
            raise WireError(f"duplicate chunk {env.seq}/{env.total}: stream already complete")
        skey = (key, env.digest)
        stream = self._streams.get(skey)
        if stream is None:
            siblings = [k for k in self._streams if k[0] == key]
            if len(siblings) >= MAX_STREAMS_PER_SENDER:
                del self._streams[siblings[0]]  # dicts keep insertion order: oldest first
            if len(self._streams) >= self.max_streams:
                raise WireError(f"too many streams in progress ({self.max_streams})")
            stream = self._streams[skey] = _Stream(digest=env.digest, total=env.total)
        if env.total != stream.total:
            raise WireError(f"chunk says total {env.total}, stream has total {stream.total}")
        if env.seq in stream.parts:
            raise WireError(f"duplicate chunk {env.seq}/{env.total}")
        if stream.size + len(env.body) > self.max_stream_bytes:
            del self._streams[skey]
            raise WireError(f"stream exceeds {self.max_stream_bytes} bytes: discarded")
        stream.parts[env.seq] = env.body
        stream.size += len(env.body)
        if len(stream.parts) < stream.total:
            return None
        del self._streams[skey]
        body = b"".join(stream.parts[i] for i in range(stream.total))
        if digest(body) != stream.digest:
            raise WireError("digest mismatch on the reassembled body: stream discarded")
        for other in [k for k in self._streams if k[0] == key]:
            del self._streams[other]
        self._done[key] = stream.digest
        return Completed(env.kind, env.round, env.sender, body, env)

    def missing(self, kind: str, rnd: int, sender: str) -> list[int] | None:
        """Chunk numbers still lacking in a stream in progress (None if no such stream)."""
        streams = [st for k, st in self._streams.items() if k[0] == (kind, rnd, sender)]
        if not streams:
            return None
        stream = streams[-1]
        return [i for i in range(stream.total) if i not in stream.parts]

    def discard(self, keep: Callable[[StreamKey], bool]) -> int:
        """Drop streams (in progress or remembered as done) for which ``keep`` is false."""
        dropped = [k for k in self._streams if not keep(k[0])]
        for k in dropped:
            del self._streams[k]
        for k in [k for k in self._done if not keep(k)]:
            del self._done[k]
        return len(dropped)

    def pending(self) -> list[StreamKey]:
        return [k for k, _ in self._streams]
