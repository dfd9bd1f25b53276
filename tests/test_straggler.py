"""A straggler (SIGSTOPped past the deadline) finishes after the close: its chunks are
rejected as late, it is told its update counts for nothing, and the round it missed is
exact over the agents that made it."""

import re
import signal
import time

import numpy as np
import pytest

from tests.conftest import decrypted_average, plaintext_fedavg

pytestmark = [pytest.mark.slow, pytest.mark.long]


def test_straggler_after_deadline(cluster_factory):
    with cluster_factory(n_agents=3, rounds=2, round_timeout_s=20.0, watch="agent-3",
                         slow_agents={"agent-3": 0.2}) as (cluster, obs):
        obs.wait_for("upload", 1, timeout=120)  # frozen in the middle of its upload
        cluster.kill("agent-3", signal.SIGSTOP)
        try:
            obs.wait_for("closed", 1, timeout=60)
        finally:
            cluster.kill("agent-3", signal.SIGCONT)
        closed = obs.rounds[1].closed
        assert closed.status == "aggregated" and closed.participants == ["agent-1", "agent-2"]
        assert "deadline reached with quorum" in closed.reason
        obs.wait_for("result", 1, timeout=30)
        expected, _ = plaintext_fedavg(cluster, 1, ["agent-1", "agent-2"])
        assert np.abs(decrypted_average(cluster, obs.results[1]) - expected).max() < 1e-6
        end = time.monotonic() + 60
        while time.monotonic() < end and "without my update" not in cluster.log_text("agent-3"):
            obs.poll(timeout=0.2)
        assert "round 1 aggregated without my update" in cluster.log_text("agent-3")
        assert re.search(r"rejected updates/digits/1/agent-3/\d+: chunk for round 1, which is not open",
                         cluster.log_text("aggregator"))
        assert "1 partial upload(s) discarded" in cluster.log_text("aggregator")
        obs.wait_for("closed", 2, timeout=60)  # the straggler is back for the next round
        assert "agent-3" in obs.rounds[2].closed.participants
