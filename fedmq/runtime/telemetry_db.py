"""The aggregator's telemetry database (SQLite): what every device spent per round
and phase, and what the aggregator itself received from it.

Shared by the aggregator (writes) and ``fedmq report`` (reads), so the schema lives
in the core. Each agent's own measurement (its telemetry message) sits next to the
aggregator's count of the bytes it accepted from that agent, so the two can be
checked against each other.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from fedmq.runtime.private_files import ensure_private_dir
from fedmq.protocol.wire import Telemetry

_SCHEMA = """
CREATE TABLE IF NOT EXISTS phases (round INTEGER, agent TEXT, phase TEXT, wall_s REAL, cpu_s REAL, cpu_pct REAL,
                                   peak_rss INTEGER, bytes_sent INTEGER, bytes_received INTEGER,
                                   PRIMARY KEY (round, agent, phase));
CREATE TABLE IF NOT EXISTS rounds (round INTEGER, agent TEXT, bytes_sent INTEGER, bytes_received INTEGER,
                                   peak_rss INTEGER, num_samples INTEGER, accuracy REAL, clipped INTEGER,
                                   received_at REAL, PRIMARY KEY (round, agent));
CREATE TABLE IF NOT EXISTS metrics (round INTEGER, agent TEXT, name TEXT, value REAL,
                                    PRIMARY KEY (round, agent, name));
CREATE TABLE IF NOT EXISTS failures (round INTEGER, agent TEXT, reason TEXT, PRIMARY KEY (round, agent));
CREATE TABLE IF NOT EXISTS uploads (round INTEGER, agent TEXT, bytes INTEGER, chunks INTEGER,
                                    PRIMARY KEY (round, agent));
"""


ROUND_AGENT = "*"  # the metrics row of a round-wide figure


class TelemetryDB:
    def __init__(self, path: Path) -> None:
        ensure_private_dir(path.parent)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        path.chmod(0o600)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)

    def record(self, rnd: int, agent: str, tele: Telemetry) -> None:
        if tele.failed is not None:  # the agent sat the round out: why, and nothing else
            self.db.execute("INSERT OR REPLACE INTO failures VALUES (?, ?, ?)", (rnd, agent, tele.failed))
            return
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("INSERT OR REPLACE INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (rnd, agent, tele.bytes_sent, tele.bytes_received, tele.peak_rss, tele.num_samples,
                             tele.accuracy, tele.clipped, time.time()))
            for name, value in tele.metrics.items():
                self.db.execute("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?)", (rnd, agent, name, value))
            for name, c in tele.phases.items():
                self.db.execute("INSERT OR REPLACE INTO phases VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                (rnd, agent, name, c.wall_s, c.cpu_s, c.cpu_pct, c.peak_rss, c.bytes_sent,
                                 c.bytes_received))
            self.db.execute("COMMIT")

    def record_round_metric(self, rnd: int, name: str, value: float) -> None:
        """A figure of the whole round (the privacy spent so far), kept under agent ``*``."""
        self.db.execute("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?)", (rnd, ROUND_AGENT, name, value))

    def add_upload(self, rnd: int, agent: str, nbytes: int) -> None:
        """Bytes of an accepted update chunk (the whole MQTT payload), as the aggregator saw it."""
        self.db.execute("INSERT INTO uploads VALUES (?, ?, ?, 1) ON CONFLICT (round, agent) DO UPDATE SET "
                        "bytes = bytes + excluded.bytes, chunks = chunks + 1", (rnd, agent, nbytes))

    def close(self) -> None:
        self.db.close()


@dataclass(frozen=True)
class PhaseRow:
    round: int
    agent: str
    phase: str
    wall_s: float
    cpu_s: float
    cpu_pct: float
    peak_rss: int
    bytes_sent: int
    bytes_received: int


def read_phases(path: Path) -> list[PhaseRow]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [PhaseRow(*r) for r in db.execute("SELECT * FROM phases ORDER BY round, agent, phase")]
    finally:
        db.close()


def read_rounds(path: Path) -> list[dict]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        rows = db.execute("SELECT r.*, u.bytes AS uploaded_bytes, u.chunks AS uploaded_chunks FROM rounds r "
                          "LEFT JOIN uploads u USING (round, agent) ORDER BY round, agent")
        return [dict(r) for r in rows]
    finally:
        db.close()


def read_metrics(path: Path) -> list[tuple[int, str, str, float]]:
    """(round, agent, metric, value): what the workloads reported."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return list(db.execute("SELECT round, agent, name, value FROM metrics ORDER BY round, agent, name"))
    finally:
        db.close()
