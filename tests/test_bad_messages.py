"""Hostile and broken messages injected into a live round over the real broker:
each is rejected with a log line saying why, and the round still closes exactly."""

import dataclasses
import time

import msgpack
import numpy as np
import pytest

from fedmq.runtime import config as cfgmod
from fedmq.protocol import topics, wire
from fedmq.protocol.chunking import split
from fedmq.runtime.mqtt_session import MqttSession
from tests.conftest import decrypted_average, plaintext_fedavg

pytestmark = pytest.mark.slow
TASK = "digits"


def _forged(sender, rnd, body=b"x" * 100, **over):
    env = split("update", TASK, rnd, sender, body, 1 << 20)[0]
    return wire.encode_envelope(dataclasses.replace(env, **over))


def test_bad_messages_rejected_and_round_still_closes(cluster_factory):
    # Two rounds: the aggregator is still live when the late replay of round 1 arrives.
    with cluster_factory(n_agents=2, rounds=2, watch="agent-1", slow_agents={"agent-1": 0.3}) as (cluster, obs):
        intruder = MqttSession(cfgmod.BrokerEndpoint(port=cluster.port), "intruder")
        intruder.connect()
        obs.wait_for("upload", 1, timeout=120)  # agent-1 is mid-upload now
        topic = topics.update_chunk(TASK, 1, "agent-1", 0)
        raw = msgpack.unpackb(_forged("agent-1", 1), raw=False)
        injections = {
            "malformed msgpack": b"\xc1\xc1not msgpack",
            "unsupported protocol version": msgpack.packb({**raw, "v": 99}, use_bin_type=True),
            "does not match topic round": _forged("agent-1", 7),
            "foreign task": msgpack.packb({**raw, "task": "other-task"}, use_bin_type=True),
            "oversize message": b"\x00" * (1024 * 1024 + 1),
            "duplicate chunk": obs.uploads[1][0],  # a replay of agent-1's real first chunk
        }
        for payload in injections.values():
            intruder.publish(topic, payload).wait_for_publish(5)
        # A complete one-chunk stream whose body does not match its digest, on the topic of
        # agent-1 while its genuine upload is in flight: rejected, and the genuine one survives.
        intruder.publish(topic, _forged("agent-1", 1, digest=b"\x01" * 32)).wait_for_publish(5)
        injections["digest mismatch"] = None

        obs.wait_for("result", 1, timeout=120)
        obs.wait_for("closed", 1, timeout=30)
        closed = obs.rounds[1].closed
        assert closed.status == "aggregated"
        assert closed.participants == ["agent-1", "agent-2"]
        expected, _ = plaintext_fedavg(cluster, 1, closed.participants)
        assert np.abs(decrypted_average(cluster, obs.results[1]) - expected).max() < 1e-6

        # A late replay of a chunk after the round closed is rejected too.
        intruder.publish(topic, injections["duplicate chunk"]).wait_for_publish(5)
        injections["which is not open"] = None
        time.sleep(1.0)
        intruder.close()
        log = cluster.log_text("aggregator")
        for reason in injections:
            assert reason in log, f"no rejection logged for {reason!r}"
        assert log.count("rejected updates/digits/1/") >= len(injections)
        assert cluster.procs["aggregator"].poll() in (None, 0), "aggregator crashed"
