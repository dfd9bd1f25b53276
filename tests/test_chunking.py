import dataclasses
import os

import pytest

from fedmq.protocol.chunking import Reassembler, split
from fedmq.protocol.wire import WireError


def _chunks(body=None, size=100, sender="a", rnd=1):
    body = body if body is not None else os.urandom(1050)
    return body, split("update", "t", rnd, sender, body, size)


def test_split_and_reassemble_in_any_order():
    body, chunks = _chunks()
    assert len(chunks) == 11 and all(len(c.body) <= 100 for c in chunks)
    r = Reassembler(max_stream_bytes=10_000)
    results = [r.add(c) for c in reversed(chunks)]
    assert results[:-1] == [None] * 10
    assert results[-1].body == body


def test_duplicate_chunk_rejected_and_stream_survives():
    body, chunks = _chunks()
    r = Reassembler(max_stream_bytes=10_000)
    r.add(chunks[0])
    with pytest.raises(WireError, match="duplicate"):
        r.add(chunks[0])
    for c in chunks[1:-1]:
        r.add(c)
    assert r.missing("update", 1, "a") == [10]
    assert r.add(chunks[-1]).body == body
    with pytest.raises(WireError, match="already complete"):
        r.add(chunks[3])


def test_digest_mismatch_discards_whole_stream():
    body, chunks = _chunks()
    r = Reassembler(max_stream_bytes=10_000)
    tampered = dataclasses.replace(chunks[4], body=b"X" * len(chunks[4].body))
    for c in chunks[:4] + [tampered] + chunks[5:-1]:
        r.add(c)
    with pytest.raises(WireError, match="digest mismatch"):
        r.add(chunks[-1])
    assert r.pending() == []


def test_forged_stream_cannot_evict_genuine_upload():
    body, chunks = _chunks()
    forged = split("update", "t", 1, "a", b"evil" * 10, 100)
    r = Reassembler(max_stream_bytes=10_000)
    for c in chunks[:5]:
        r.add(c)
    with pytest.raises(WireError, match="digest mismatch"):
        r.add(dataclasses.replace(forged[0], digest=chunks[0].digest[::-1]))
    for c in chunks[5:-1]:
        r.add(c)
    assert r.add(chunks[-1]).body == body


def test_oversize_stream_and_inconsistent_total():
    _, chunks = _chunks(size=500)
    r = Reassembler(max_stream_bytes=800)
    # The announced total already exceeds the limit: refused at the first chunk.
    with pytest.raises(WireError, match="exceed"):
        r.add(chunks[0])
    last = chunks[-1]
    r = Reassembler(max_stream_bytes=1200)  # 3 x 500 announced fits only by the last chunk's size
    r.add(chunks[0])
    r.add(chunks[1])
    with pytest.raises(WireError, match="exceeds"):
        r.add(dataclasses.replace(last, body=last.body + b"x" * 300))
    r = Reassembler(max_stream_bytes=10_000)
    r.add(chunks[0])
    with pytest.raises(WireError, match="total"):
        r.add(dataclasses.replace(chunks[1], total=7))


def test_discard_by_round():
    r = Reassembler(max_stream_bytes=10_000)
    r.add(_chunks(rnd=1)[1][0])
    r.add(_chunks(rnd=2)[1][0])
    assert r.discard(keep=lambda key: key[1] > 1) == 1
    assert [k[1] for k in r.pending()] == [2]


def test_empty_body_is_one_chunk():
    chunks = split("status", "t", 0, "a", b"", 10)
    assert len(chunks) == 1
    assert Reassembler(max_stream_bytes=10).add(chunks[0]).body == b""


def test_tiny_chunk_cannot_announce_a_huge_stream():
    """Issue 14.4: a 1-byte chunk claiming total = 2^20 is refused, and so is any
    total whose chunks could not fit the stream limit."""
    r = Reassembler(max_stream_bytes=1 << 20, min_chunk=1024)
    env = _chunks(size=1)[1][0]
    with pytest.raises(WireError, match="at least 1024"):
        r.add(dataclasses.replace(env, total=1 << 20))
    with pytest.raises(WireError, match="exceed"):
        r.add(dataclasses.replace(env, body=b"x" * 2048, total=1 << 20))
    with pytest.raises(WireError, match="exceeds"):  # the last chunk of an impossible stream
        r.add(dataclasses.replace(env, seq=(1 << 20) - 1, total=1 << 20))
    assert r.pending() == []
