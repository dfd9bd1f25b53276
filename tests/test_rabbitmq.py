"""The clustered-broker path: a whole encrypted round, exact, through a RabbitMQ node's
MQTT listener (a node of the test's own). Optional by nature — it runs where
RabbitMQ is installed (Debian: rabbitmq-server) and says so where it is not."""

import numpy as np
import pytest

from fedmq.tools.local_broker import RabbitMQProcess, rabbitmq_binary
from fedmq.tools.local_cluster import free_port
from tests.conftest import decrypted_average, plaintext_fedavg

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(rabbitmq_binary() is None, reason="RabbitMQ is not installed here (optional path)")]


@pytest.fixture
def rabbitmq(tmp_path):
    node = RabbitMQProcess(tmp_path / "rabbitmq", free_port())
    node.start()
    try:
        yield node.mqtt_port
    finally:
        node.stop()


def test_round_through_rabbitmq_mqtt(cluster_factory, rabbitmq):
    with cluster_factory(n_agents=2, rounds=2, port=rabbitmq, embedded_broker=False) as (cluster, obs):
        obs.wait_for("result", 2, timeout=180)
        obs.wait_for("closed", 2, timeout=30)
        for rnd in (1, 2):
            closed = obs.rounds[rnd].closed
            assert closed.status == "aggregated" and closed.participants == ["agent-1", "agent-2"]
        expected, total = plaintext_fedavg(cluster, 2, ["agent-1", "agent-2"])
        assert obs.results[2].total_weight == total
        assert np.abs(decrypted_average(cluster, obs.results[2]) - expected).max() < 1e-6
