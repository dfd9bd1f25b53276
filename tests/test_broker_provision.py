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
                     run_as=getpass.getuser(), shard_workers=2)
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
                     if role == "aggregator" or role.startswith("shard-") else cfgmod.KeyAuthorityConfig,
                     prov.config(role)).broker
    return MqttSession(ep.model_copy(update={"persistent_session": False, **over}), client_id or f"{role}-probe")


_drain = drain_topics


def test_whole_round_through_tls_mosquitto_with_passwords(provisioned, tmp_path):
    prov = provisioned
    cluster = Cluster(workdir=tmp_path, port=prov.port, n_agents=2, rounds=1)
    try:
        # Provisioned with two shard workers: the round is sharded through the real ACLs.
        for role in ("keyauthority", "aggregator", "shard-1", "shard-2", *prov.agents):
            cluster.start(role, "agent" if role.startswith("agent") else "aggregator" if role.startswith("shard")
                          else role, "--config", str(prov.config(role)))
        end = time.monotonic() + 180
        while "round 1 aggregated" not in cluster.log_text("aggregator"):
            assert time.monotonic() < end, cluster.log_text("aggregator")[-2000:]
            time.sleep(0.5)
        assert "combined shard-2's partial sum" in cluster.log_text("aggregator")
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


def test_shard_acls_keep_shards_apart(provisioned):
    """A shard worker reads its own shard only and publishes only its own partial
    sums; the root reads partial sums, never a shard's updates."""
    prov = provisioned
    w1 = _session(prov, "shard-1")
    w1.subscribe("shards/digits/#")
    w1.subscribe("keys/digits/agents/+/+")
    w1.connect()
    root = _session(prov, "aggregator")
    root.subscribe("shards/digits/#")
    root.subscribe("partials/digits/#")
    root.connect()
    agent = _session(prov, "agent-1")
    agent.connect()
    for topic in ("shards/digits/shard-1/1/agent-1/0", "shards/digits/shard-2/1/agent-1/0",
                  "shards/digits/shard-1/1/agent-2/0"):  # the last one forged as agent-2: dropped
        agent.publish(topic, b"update chunk").wait_for_publish(5)
    for topic in ("partials/digits/1/shard-1/0", "partials/digits/1/shard-2/0"):  # the second forged
        w1.publish(topic, b"partial").wait_for_publish(5)
    _session(prov, "keyauthority").connect()
    time.sleep(0.5)
    assert _drain(w1, 1.0) == ["shards/digits/shard-1/1/agent-1/0"]
    assert _drain(root, 1.0) == ["partials/digits/1/shard-1/0"]
    assert "user shard-2" in (prov.out / "acl").read_text()
    shard_cfg = cfgmod.load(cfgmod.AggregatorConfig, prov.config("shard-2"))
    assert shard_cfg.shard_worker and cfgmod.load(cfgmod.AggregatorConfig, prov.config("aggregator")).shard_workers \
        == ["shard-1", "shard-2"]
    assert set(cfgmod.load(cfgmod.KeyAuthorityConfig, prov.config("keyauthority")).worker_keys) == {"shard-1",
                                                                                                   "shard-2"}
    for s in (w1, root, agent):
        s.close(flush_s=0.5)


def test_rabbitmq_rules_keep_shards_apart_too():
    import re

    from broker.rabbitmq_permissions import topic_rules

    kw = dict(aggregator="aggregator", authority="keyauthority", workers=["shard-1", "shard-2"])
    w_write, w_read = topic_rules("digits", "shard-1", **kw)
    assert re.match(w_read, "shards.digits.shard-1.1.agent-1.0") and not re.match(w_read, "shards.digits.shard-2.1.a.0")
    assert not re.match(w_read, "keys.digits.agents.agent-1.0") and not re.match(w_read, "updates.digits.1.a.0")
    assert re.match(w_write, "partials.digits.1.shard-1.0") and not re.match(w_write, "partials.digits.1.shard-2.0")
    a_write, _ = topic_rules("digits", "agent-1", **kw)
    assert re.match(a_write, "shards.digits.shard-2.1.agent-1.0") and not re.match(a_write, "shards.digits.s.1.agent-2.0")
    _, r_read = topic_rules("digits", "aggregator", **kw)
    assert re.match(r_read, "partials.digits.1.shard-1.0") and not re.match(r_read, "shards.digits.shard-1.1.a.0")


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
