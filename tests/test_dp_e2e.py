"""Client-level DP through the real system: three agents under masked quantize with
a budget calibrated for two rounds. Each agent adds its share of the noise (the
shares' spread matches the accountant's sigma), the masked sum is exactly the mean
of the noised updates, epsilon is reported every round (Prometheus, telemetry
database, ``fedmq report``), and the task opens no third round."""

import re
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from fedmq.privacy import client_dp
from fedmq.protocol import wire
from fedmq.runtime import config as cfgmod
from fedmq.runtime.telemetry_db import ROUND_AGENT, read_metrics
from fedmq.tools.local_cluster import free_port
from tests.conftest import oracle

pytestmark = pytest.mark.slow

PLAN = cfgmod.QuantizationSettings(layers=[
    cfgmod.LayerQuantSettings(bits=8, mode="symmetric", rounding="stochastic", lo=-1.0, hi=1.0)],
    n_ref=1, max_agents=4)
DP = cfgmod.DpSettings(epsilon=50.0, delta=1e-5, clip=0.5, rounds=2)
AGENTS = ["agent-1", "agent-2", "agent-3"]


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


@pytest.mark.long  # real processes, ~30 s: CI's long pass runs it
def test_dp_noise_accounting_and_budget_stop(cluster_factory, tmp_path):
    prot = wire.Protection(scheme="quantize", p=0.0, mode="random", secure_masking=True)
    metrics_port = free_port()
    with cluster_factory(n_agents=3, rounds=5, protection=prot, quantization=PLAN, dp=DP, min_agents=2,
                         target_agents=4,
                         # a pause of 4 s before each round: time to read the metrics after round 1
                         aggregator_overrides={"metrics_port": metrics_port, "selection_grace_s": 4.0}) as (cluster, obs):
        obs.wait_for("closed", 1, timeout=120)
        z = client_dp.calibrate(DP.epsilon, DP.delta, DP.rounds)
        eps1 = client_dp.epsilon_after(z, 1, DP.delta)
        m = re.search(r"^fedmq_dp_epsilon (\S+)$", _scrape(metrics_port), re.M)
        assert m and float(m.group(1)) == pytest.approx(eps1, rel=1e-6)
        obs.wait_for("closed", 2, timeout=120)
        end = time.monotonic() + 60
        while cluster.procs["aggregator"].poll() is None and time.monotonic() < end:
            time.sleep(0.2)
        assert cluster.procs["aggregator"].poll() == 0, "the aggregator must stop once the budget is spent"
        assert 3 not in obs.rounds, "no round may open past the budget"
        assert "privacy budget spent: 2 aggregated round(s)" in cluster.log_text("aggregator")
        for rnd in (1, 2):
            closed = obs.rounds[rnd].closed
            assert closed.status == "aggregated" and closed.participants == AGENTS
            dumps = [oracle(cluster, a, f"round{rnd}") for a in AGENTS]
            assert all(int(d["num_samples"]) == 1 for d in dumps)  # DP weighs every update 1
            # Each agent's noise share has the spread the accountant asked for: z C / sqrt(min_agents).
            share = client_dp.noise_std(wire.DifferentialPrivacy(clip=DP.clip, noise_multiplier=z, noise_agents=2,
                                                                 epsilon=DP.epsilon, delta=DP.delta))
            for d in dumps:
                assert np.std(d["weights"] - d["base"]) == pytest.approx(share, rel=0.05)
        # Round 1's model, as every agent rebuilt it (round 2's base), is the mean of the
        # noised updates — the masks cancelled — within the plan's step.
        truth = sum(oracle(cluster, a, "round1")["weights"] for a in AGENTS) / 3
        for a in AGENTS:
            assert np.abs(oracle(cluster, a, "round2")["base"] - truth).max() <= 3 * (2.0 / 254) / 3 + 1e-6
        db = cluster.workdir / "state/aggregator/telemetry.sqlite"
    spent = {rnd: v for rnd, agent, name, v in read_metrics(db) if agent == ROUND_AGENT and name == "dp_epsilon"}
    assert spent[1] == pytest.approx(eps1, rel=1e-6) and spent[1] < spent[2] <= DP.epsilon * (1 + 1e-6)
    out = subprocess.run([sys.executable, "-m", "fedmq", "report", "--db", str(db)], capture_output=True, text=True,
                         timeout=60, env={"COLUMNS": "200", "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert "Differential privacy spent" in out.stdout and f"{spent[2]:.3f}" in out.stdout
