"""Unfinished uploads wait on disk (SQLite), not in the aggregator's memory, and a
restarted aggregator finds them again."""

import dataclasses
import os

import pytest

from aggregator.round_state import RoundState
from aggregator.round_store import RoundStore, StoredParts
from fedmq.protocol.chunking import Reassembler, split
from fedmq.protocol.wire import WireError


def _state() -> RoundState:
    return RoundState(round=1, model_version=0, selected=frozenset({"a", "b"}), quorum=1, deadline=1e12)


def _rows(store: RoundStore) -> int:
    return store.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]


def test_interleaved_uploads_are_kept_on_disk_and_survive_a_restart(tmp_path):
    store = RoundStore(tmp_path)
    store.open(_state())
    r = Reassembler(max_stream_bytes=1 << 20, parts=StoredParts(store))
    bodies = {s: os.urandom(10_000) for s in ("a", "b")}
    streams = {s: split("update", "t", 1, s, bodies[s], 1000) for s in bodies}
    for i in range(9):  # 9 of 10 chunks of both, interleaved
        for s in bodies:
            assert r.add(streams[s][i]) is None
    assert _rows(store) == 18
    assert not hasattr(r, "_parts") and all(not hasattr(st, "parts") for st in r._streams.values())

    # kill -9: a new process, a new store on the same file, bookkeeping rebuilt from disk
    store2 = RoundStore(tmp_path)
    r2 = Reassembler(max_stream_bytes=1 << 20, parts=StoredParts(store2))
    for env in store2.chunk_envelopes():
        r2.add(env, stored=True)
    assert r2.missing("update", 1, "a") == [9] and r2.missing("update", 1, "b") == [9]
    done = r2.add(streams["a"][9])
    assert bytes(done.body) == bodies["a"]
    with pytest.raises(WireError, match="duplicate"):
        r2.add(streams["a"][3])


def test_a_corrupt_stream_is_dropped_from_disk(tmp_path):
    store = RoundStore(tmp_path)
    store.open(_state())
    r = Reassembler(max_stream_bytes=1 << 20, parts=StoredParts(store))
    chunks = split("update", "t", 1, "a", os.urandom(3000), 1000)
    chunks[1] = dataclasses.replace(chunks[1], body=b"x" * 1000)  # same digest claimed, other bytes
    r.add(chunks[0])
    r.add(chunks[1])
    with pytest.raises(WireError, match="digest mismatch"):
        r.add(chunks[2])
    assert _rows(store) == 0 and r.missing("update", 1, "a") is None
