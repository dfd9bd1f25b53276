"""A provisioned mosquitto, really started: a whole encrypted round through its TLS
listener with per-role passwords; ACLs that hold (no reading another agent's keys,
no publishing as another agent, the aggregator never sees a key topic); a wrong
password refused; an oversize chunk refused by the broker with a clear error."""

import getpass
import subprocess
import time

import pytest
from pydantic import SecretStr

from broker.provision import mosquitto_hash, provision
from fedmq.runtime import config as cfgmod
from fedmq.tools.local_cluster import Cluster, free_port, wait_for_port
from fedmq.runtime.mqtt_session import BrokerError, MqttSession
from tests.conftest import drain_topics

pytestmark = pytest.mark.slow


@pytest.fixture
def provisioned(tmp_path):
    from tests.conftest import mosquitto_binary

    prov = provision(tmp_path / "broker", agents=2, port=free_port(), tls=True, rounds=1, chunk_size=64 * 1024,
                     run_as=getpass.getuser())
    log = open(tmp_path / "mosquitto.log", "wb")
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(prov.conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(prov.port, timeout=15)
        yield prov
    finally:
        proc.terminate()
        proc.wait(10)


def _session(prov, role: str, client_id: str | None = None, **over) -> MqttSession:
    ep = cfgmod.load(cfgmod.AgentConfig if role.startswith("agent") else cfgmod.AggregatorConfig
                     if role == "aggregator" else cfgmod.KeyAuthorityConfig, prov.config(role)).broker
    return MqttSession(ep.model_copy(update={"persistent_session": False, **over}), client_id or f"{role}-probe")


_drain = drain_topics


def test_whole_round_through_tls_mosquitto_with_passwords(provisioned, tmp_path):
    prov = provisioned
    cluster = Cluster(workdir=tmp_path, port=prov.port, n_agents=2, rounds=1)
    try:
        for role in ("keyauthority", "aggregator", *prov.agents):
            cluster.start(role, "agent" if role.startswith("agent") else role, "--config", str(prov.config(role)))
        end = time.monotonic() + 180
        while "round 1 aggregated" not in cluster.log_text("aggregator"):
            assert time.monotonic() < end, cluster.log_text("aggregator")[-2000:]
            time.sleep(0.5)
        end = time.monotonic() + 30
        while not all("round 1 result from 2 agents decrypted" in cluster.log_text(a) for a in prov.agents):
            assert time.monotonic() < end
            time.sleep(0.2)
    finally:
        cluster.stop_all()


def test_acls_hold(provisioned):
    prov = provisioned
    spy = _session(prov, "agent-1")
    spy.subscribe("keys/digits/agents/agent-2/+")  # not its own: the broker must deliver nothing
    spy.connect()
    agg = _session(prov, "aggregator")
    agg.subscribe("keys/digits/#")  # the aggregator may never read a key topic
    agg.subscribe("updates/digits/#")
    agg.connect()
    ka = _session(prov, "keyauthority")
    ka.connect()
    ka.publish("keys/digits/agents/agent-2/0", b"sealed for agent-2").wait_for_publish(5)
    spy.publish("updates/digits/1/agent-2/0", b"forged as agent-2").wait_for_publish(5)  # dropped by the ACL
    spy.publish("updates/digits/1/agent-1/0", b"its own").wait_for_publish(5)
    spy.publish("keys/digits/agents/agent-1/0", b"agents cannot publish keys").wait_for_publish(5)
    time.sleep(0.5)
    assert _drain(spy, 1.0) == []
    assert _drain(agg, 1.0) == ["updates/digits/1/agent-1/0"]
    for s in (spy, agg, ka):
        s.close(flush_s=0.5)


def test_wrong_password_is_refused(provisioned):
    with pytest.raises(BrokerError, match="refused"):
        _session(provisioned, "agent-1", password=SecretStr("not-the-password")).connect()


def test_oversize_chunk_is_refused_with_a_clear_error(provisioned):
    s = _session(provisioned, "agent-1")
    s.connect()
    start = time.monotonic()
    with pytest.raises(BrokerError, match="max packet size"):
        s.send_stream(lambda seq: f"updates/digits/1/agent-1/{seq}", None, task="digits", rnd=1,
                      chunk_size=200 * 1024, encoded=("update", b"x" * 300 * 1024), timeout_s=10)
    assert time.monotonic() - start < 15  # an error, not a hang
    s.close(flush_s=0.2)


def test_password_hash_format_is_mosquittos():
    h = mosquitto_hash("secret", salt=b"0123456789ab")
    assert h.startswith("$7$101$MDEyMzQ1Njc4OWFi$") and len(h.split("$")[-1]) == 88


def test_an_agent_cannot_take_the_aggregators_client_id(provisioned):
    """use_username_as_clientid: agent-1 asking for client id 'aggregator' gets its own
    user name as client id, so the real aggregator is not kicked off (issue 14.6)."""
    agg = _session(provisioned, "aggregator", client_id="aggregator")
    agg.connect()
    impostor = _session(provisioned, "agent-1", client_id="aggregator")
    impostor.connect()
    time.sleep(1.5)
    assert agg.connected and impostor.connected
    text = provisioned.conf.read_text()
    assert "use_username_as_clientid true" in text and "max_queued_bytes 1073741824" in text
    for s in (impostor, agg):
        s.close(flush_s=0.5)
