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


@pytest.mark.long
def test_provisioned_rabbitmq_permissions_hold(tmp_path):
    """`fedmq broker provision --rabbitmq`: the node loads the definitions; agents
    publish only their own topics and read only their own keys, the aggregator never
    reads a key topic, a wrong password is refused (issue 14, broker hardening)."""
    import time

    from pydantic import SecretStr

    from broker.provision import provision
    from fedmq.runtime import config as cfgmod
    from fedmq.runtime.mqtt_session import BrokerError, MqttSession

    port = free_port()
    prov = provision(tmp_path / "broker", agents=2, port=port, rounds=1, rabbitmq=True)
    node = RabbitMQProcess(tmp_path / "rabbitmq", port, definitions=prov.out / "rabbitmq" / "definitions.json")
    node.start()
    try:
        def session(role, client_id=None, **over):
            model = cfgmod.AgentConfig if role.startswith("agent") else cfgmod.AggregatorConfig \
                if role == "aggregator" else cfgmod.KeyAuthorityConfig
            ep = cfgmod.load(model, prov.config(role)).broker.model_copy(update={"persistent_session": False, **over})
            return MqttSession(ep, client_id or role)

        from tests.conftest import drain_topics as drain

        with pytest.raises(BrokerError, match="refused"):
            session("agent-1", password=SecretStr("not-the-password")).connect()
        agg = session("aggregator")
        agg.subscribe("updates/digits/+/+/+")
        agg.connect()
        ka = session("keyauthority")
        ka.connect()
        a1 = session("agent-1")
        a1.subscribe("keys/digits/agents/agent-1/+")
        a1.connect()
        ka.publish("keys/digits/agents/agent-1/0", b"sealed for agent-1").wait_for_publish(5)
        a1.publish("updates/digits/1/agent-1/0", b"its own").wait_for_publish(5)
        assert drain(a1, 2.0) == ["keys/digits/agents/agent-1/0"]
        assert drain(agg, 2.0) == ["updates/digits/1/agent-1/0"]
        # Refused: another agent's key topic, and the aggregator reading any key topic.
        # (RabbitMQ 3.10 closes the connection on a refused subscription: no SUBACK comes.)
        spy = session("agent-2", connect_timeout_s=5.0)
        spy.subscribe("keys/digits/agents/agent-1/+")
        with pytest.raises(BrokerError):
            spy.connect()
        agg.close(flush_s=0.5)
        snoop = session("aggregator", connect_timeout_s=5.0)  # its own client id: only the topic rule refuses
        snoop.subscribe("keys/digits/#")
        with pytest.raises(BrokerError):
            snoop.connect()
        agg = session("aggregator")
        agg.subscribe("updates/digits/+/+/+")
        agg.connect()
        # Forging another agent's update: RabbitMQ drops the publisher's connection.
        forger = session("agent-2")
        forger.connect()
        forger.publish("updates/digits/1/agent-1/0", b"forged as agent-1")
        time.sleep(1.0)
        assert drain(agg, 1.0) == []
        for s in (agg, ka, a1):
            s.close(flush_s=0.5)
    finally:
        node.stop()
    log = (node.workdir / "log").glob("*.log")
    assert any("access to topic" in p.read_text(errors="replace") or "not authorised" in p.read_text(
        errors="replace") or "access_refused" in p.read_text(errors="replace") for p in log)
