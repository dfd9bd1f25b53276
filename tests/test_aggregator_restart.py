"""kill -9 of the aggregator mid-round: the restarted process resumes the same round
from its SQLite store — folded updates are neither lost nor counted twice, finished
agents are not asked again, an unfinished upload is completed by resending only what
is missing — and the aggregate is exact."""

import signal
import time

import numpy as np
import pytest

from tests.conftest import decrypted_average, plaintext_fedavg

pytestmark = pytest.mark.slow
AGENTS = ["agent-1", "agent-2", "agent-3"]


@pytest.mark.long  # real processes, ~30 s: CI's long pass runs it
def test_kill9_mid_round_then_resume(cluster_factory):
    # agent-3 uploads 17 chunks 0.3 s apart: the crash lands in the middle of its upload.
    with cluster_factory(n_agents=3, rounds=2, watch="agent-3", slow_agents={"agent-3": 0.3}) as (cluster, obs):
        end = time.monotonic() + 120
        while time.monotonic() < end:
            obs.poll(timeout=0.1)
            if "2/3 reported" in cluster.log_text("aggregator") and len(obs.uploads.get(1, [])) >= 3:
                break
        else:
            pytest.fail("agents 1 and 2 never got folded while agent-3 was uploading")
        cluster.kill("aggregator", signal.SIGKILL)
        cluster.procs["aggregator"].wait(10)
        time.sleep(1.5)  # agent-3's chunks now go nowhere
        cluster.start_role("aggregator")

        obs.wait_for("result", 1, timeout=120)
        obs.wait_for("closed", 1, timeout=30)
        closed = obs.rounds[1].closed
        assert closed.status == "aggregated" and closed.participants == AGENTS
        expected, total = plaintext_fedavg(cluster, 1, AGENTS)
        assert obs.results[1].total_weight == total  # nobody counted twice
        assert np.abs(decrypted_average(cluster, obs.results[1]) - expected).max() < 1e-6
        obs.wait_for("closed", 2, timeout=120)  # and the task goes on
        assert obs.rounds[2].closed.participants == AGENTS

    log = cluster.log_text("aggregator")
    assert "resumed round 1 after a restart: 2 update(s) already folded ['agent-1', 'agent-2']" in log
    assert "asked agent-3 for" in log and "asked agent-1" not in log and "asked agent-2" not in log
    for a in ("agent-1", "agent-2"):
        agent_log = cluster.log_text(a)
        assert agent_log.count("round 1 update sent") == 1 and "resent" not in agent_log
    assert "at the aggregator's request" in cluster.log_text("agent-3")
