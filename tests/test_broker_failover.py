"""Client-side failover over a list of broker nodes (``broker.failover``): a session
whose node goes away reconnects to the next one, resubscribes and goes on; a session
started while the first node is down connects to the next. Two real mosquitto
brokers of the test's own on loopback."""

from __future__ import annotations

import time

import pytest

from fedmq.runtime import config as cfgmod
from fedmq.runtime.mqtt_session import BrokerError, MqttSession
from fedmq.tools.local_broker import MosquittoProcess
from fedmq.tools.local_cluster import free_port
from tests.conftest import mosquitto_binary

pytestmark = pytest.mark.slow


@pytest.fixture
def two_brokers(tmp_path):
    mosquitto_binary()
    nodes = [MosquittoProcess(tmp_path / f"node-{i}", free_port(), persistence=False) for i in range(2)]
    for n in nodes:
        n.start()
    try:
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def _wait(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, what
        time.sleep(0.1)


def test_a_session_fails_over_to_the_next_node_and_keeps_its_subscriptions(two_brokers):
    a, b = two_brokers
    ep = cfgmod.BrokerEndpoint(port=a.port, failover=[f"127.0.0.1:{b.port}"])
    assert ep.nodes == [("127.0.0.1", a.port), ("127.0.0.1", b.port)]
    s = MqttSession(ep, "agent-x")
    s.subscribe("rounds/#")
    s.connect()
    assert s.client.port == a.port
    a.stop()  # the node goes away for good
    _wait(lambda: s.connected and s.client.port == b.port, 20, "no failover to the second node")
    pub = MqttSession(cfgmod.BrokerEndpoint(port=b.port, persistent_session=False), "publisher")
    pub.connect()
    pub.publish("rounds/digits/1/start", b"hello").wait_for_publish(5)
    msg = s.inbox.get(timeout=10)  # resubscribed on the new node
    assert (msg.topic, msg.payload) == ("rounds/digits/1/start", b"hello")
    for x in (s, pub):
        x.close(flush_s=0.5)


def test_a_session_started_while_the_first_node_is_down_uses_the_next(two_brokers):
    a, b = two_brokers
    a.stop()
    s = MqttSession(cfgmod.BrokerEndpoint(port=a.port, failover=[f"127.0.0.1:{b.port}"]), "agent-y")
    s.connect()
    assert s.connected and s.client.port == b.port
    s.close(flush_s=0.2)
    with pytest.raises(BrokerError, match="cannot reach broker"):
        MqttSession(cfgmod.BrokerEndpoint(port=a.port), "agent-z").connect()


def test_a_malformed_failover_node_is_a_config_error():
    with pytest.raises(ValueError, match="failover"):
        cfgmod.BrokerEndpoint(failover=["no-port-here"])
