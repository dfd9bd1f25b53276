"""Crash-safe persistence of the open round (SQLite, WAL, one transaction per event).

What survives a ``kill -9``: the round's state (selected agents, who finished with
which weight, deadline, layout), the running encrypted sum exactly as it was after
the last folded update, and every chunk received of uploads not yet complete.
Folding an update is one transaction — the new sum, the agent's weight, and the
deletion of its chunks commit together — so after a restart an update is either
counted once or not at all, and a finished agent is never asked to upload again.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

from fedmq.runtime.private_files import ensure_private_dir
from fedmq.protocol.chunking import StreamKey
from fedmq.protocol.wire import Envelope, decode_envelope, encode_envelope

from aggregator.round_state import RoundState

_SCHEMA = """
CREATE TABLE IF NOT EXISTS open_round (id INTEGER PRIMARY KEY CHECK (id = 1), state TEXT NOT NULL,
                                       layout TEXT NOT NULL, sum BLOB);
CREATE TABLE IF NOT EXISTS chunks (round INTEGER, sender TEXT, digest BLOB, seq INTEGER, envelope BLOB,
                                   PRIMARY KEY (round, sender, digest, seq));
CREATE TABLE IF NOT EXISTS sum_ciphertexts (i INTEGER PRIMARY KEY, blob BLOB NOT NULL);
"""


class RoundStore:
    def __init__(self, state_dir: Path) -> None:
        ensure_private_dir(state_dir)
        path = state_dir / "open_round.sqlite"
        self.db = sqlite3.connect(path, isolation_level=None)  # explicit transactions below
        path.chmod(0o600)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)

    def open(self, st: RoundState) -> None:
        with self._tx():
            self.db.execute("DELETE FROM chunks")
            self.db.execute("DELETE FROM sum_ciphertexts")
            self.db.execute("INSERT OR REPLACE INTO open_round VALUES (1, ?, ?, NULL)", (_dump(st), "{}"))

    def add_chunk(self, env: Envelope, raw: bytes) -> None:
        # A chunk needs to survive a crash of this process, not of the OS: an agent can
        # always be asked again. WAL + synchronous=NORMAL gives exactly that without an
        # fsync per chunk; the fold (which cannot be asked for again) commits with FULL.
        self.db.execute("PRAGMA synchronous=NORMAL")
        try:
            with self._tx():
                self.db.execute("INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?, ?)",
                                (env.round, env.sender, env.digest, env.seq, raw))
        finally:
            self.db.execute("PRAGMA synchronous=FULL")

    def chunk_bodies(self, rnd: int, sender: str, digest: bytes) -> Iterator[bytes]:
        rows = self.db.execute("SELECT envelope FROM chunks WHERE round = ? AND sender = ? AND digest = ? "
                               "ORDER BY seq", (rnd, sender, digest))
        for (raw,) in rows:
            yield decode_envelope(raw, max_bytes=len(raw)).body

    def drop_chunks(self, rnd: int, sender: str, digest: bytes) -> None:
        with self._tx():
            self.db.execute("DELETE FROM chunks WHERE round = ? AND sender = ? AND digest = ?", (rnd, sender, digest))

    def sum_ciphertexts(self) -> list[bytes]:
        return [b for (b,) in self.db.execute("SELECT blob FROM sum_ciphertexts ORDER BY i")]

    def chunk_envelopes(self) -> Iterator[Envelope]:
        """Chunks of unfinished uploads, one at a time (a restart re-reads them)."""
        for (raw,) in self.db.execute("SELECT envelope FROM chunks ORDER BY sender, digest, seq"):
            yield decode_envelope(raw, max_bytes=len(raw))

    def fold(self, st: RoundState, layout: dict, meta: bytes, ciphertexts: Iterable[bytes],
             senders: Iterable[str] = ()) -> None:
        """The sum after folding an update (its metadata, and its ciphertexts a row
        each), the agent's recorded weight, and the deletion of its chunks (and of
        ``senders``' chunks: a shard worker's partial sum): one transaction."""
        with self._tx():
            self.db.execute("UPDATE open_round SET state = ?, layout = ?, sum = ? WHERE id = 1",
                            (_dump(st), json.dumps(layout), meta))
            self.db.execute("DELETE FROM sum_ciphertexts")
            for i, blob in enumerate(ciphertexts):
                self.db.execute("INSERT INTO sum_ciphertexts VALUES (?, ?)", (i, blob))
            for sender in [*st.weights, *senders]:
                self.db.execute("DELETE FROM chunks WHERE sender = ?", (sender,))

    def update_state(self, st: RoundState) -> None:
        with self._tx():
            self.db.execute("UPDATE open_round SET state = ? WHERE id = 1", (_dump(st),))

    def close(self) -> None:
        with self._tx():
            self.db.execute("DELETE FROM open_round")
            self.db.execute("DELETE FROM sum_ciphertexts")
            self.db.execute("DELETE FROM chunks")

    def load(self) -> tuple[RoundState, dict, bytes | None] | None:
        row = self.db.execute("SELECT state, layout, sum FROM open_round WHERE id = 1").fetchone()
        if row is None:
            return None
        raw = json.loads(row[0])
        offline = raw["offline"]
        if isinstance(offline, list):  # stores written before offline times were kept
            offline = dict.fromkeys(offline, 0.0)
        st = RoundState(**{**raw, "selected": frozenset(raw["selected"]), "offline": offline})
        return st, json.loads(row[1]), row[2]

    def _tx(self):
        return _Transaction(self.db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


class StoredParts:
    """The aggregator's :class:`~fedmq.chunking.PartStore`: unfinished uploads wait in
    the round store on disk, so concurrent uploads cost no memory and a restart finds
    them. A completed stream's chunks stay until the fold that uses them commits."""

    def __init__(self, store: RoundStore) -> None:
        self.store = store

    def put(self, env: Envelope) -> None:
        self.store.add_chunk(env, encode_envelope(env))

    def bodies(self, key: StreamKey, digest: bytes) -> Iterator[bytes]:
        return self.store.chunk_bodies(key[1], key[2], digest)

    def drop(self, key: StreamKey, digest: bytes) -> None:
        self.store.drop_chunks(key[1], key[2], digest)

    def completed(self, key: StreamKey, digest: bytes) -> None:
        pass  # deleted by RoundStore.fold, in the same transaction as the new sum


def _dump(st: RoundState) -> str:
    d = asdict(st)
    d["selected"] = sorted(st.selected)
    return json.dumps(d)
