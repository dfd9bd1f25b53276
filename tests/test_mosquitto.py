"""The same encrypted round through a real mosquitto, just by pointing the config at it."""

import numpy as np
import pytest

from tests.conftest import decrypted_average, plaintext_fedavg

pytestmark = pytest.mark.slow


def test_round_through_mosquitto(cluster_factory, mosquitto):
    with cluster_factory(n_agents=2, rounds=1, port=mosquitto, embedded_broker=False) as (cluster, obs):
        obs.wait_for("result", 1, timeout=120)
        obs.wait_for("closed", 1, timeout=30)
        closed = obs.rounds[1].closed
        assert closed.status == "aggregated" and closed.participants == ["agent-1", "agent-2"]
        expected, _ = plaintext_fedavg(cluster, 1, closed.participants)
        assert np.abs(decrypted_average(cluster, obs.results[1]) - expected).max() < 1e-6
