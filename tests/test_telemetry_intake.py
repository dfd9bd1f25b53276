"""Telemetry is validated before it is stored (issue 14.6): known phases, open or
recent rounds, once per agent and round — an agent cannot grow the aggregator's
database or its Prometheus series at will."""

import msgpack
import pytest

from aggregator.service import Aggregator
from fedmq.protocol import wire
from fedmq.protocol.chunking import single, split
from fedmq.runtime import config as cfgmod


def _tele(phases):
    cost = wire.PhaseCost(wall_s=1.0, cpu_s=1.0)
    return wire.Telemetry(phases={p: cost for p in phases}, bytes_sent=1, bytes_received=1, peak_rss=1,
                          num_samples=10)


def test_telemetry_rules(tmp_path):
    agg = Aggregator(cfgmod.AggregatorConfig(state_dir=tmp_path))
    agg.next_round = 10
    ok = single(_tele(["train", "encrypt"]), task="digits", rnd=9, sender="agent-1")
    agg._on_telemetry(ok)
    assert agg.telemetry.db.execute("SELECT COUNT(*) FROM phases").fetchone()[0] >= 1
    with pytest.raises(wire.WireError, match="already reported round 9"):
        agg._on_telemetry(ok)
    with pytest.raises(wire.WireError, match="only rounds 6..10"):
        agg._on_telemetry(single(_tele(["train"]), task="digits", rnd=1 << 40, sender="agent-1"))
    with pytest.raises(wire.WireError, match="unknown phase"):
        agg._on_telemetry(single(_tele(["train", "x-0001"]), task="digits", rnd=8, sender="agent-1"))
    # Thousands of phase names (built by hand: our own encoder would refuse them): refused by the schema.
    raw = {"phases": {f"p{i}": {"wall_s": 1.0, "cpu_s": 1.0} for i in range(1000)}, "bytes_sent": 1,
           "bytes_received": 1, "peak_rss": 1, "num_samples": 10}
    body = msgpack.packb(raw, use_bin_type=True)
    with pytest.raises(wire.WireError, match="phases"):
        agg._on_telemetry(split("telemetry", "digits", 8, "agent-2", body, len(body))[0])
