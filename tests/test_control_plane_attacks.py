"""The security review's attacks (issue 14), each run against a real deployment on
the embedded broker — no ACLs, so anyone may publish anywhere. Each must fail with
a log line that names it, and the honest agents' rounds must stay exact."""

import dataclasses
import os
import queue
import signal
import time

import numpy as np
import pytest

from fedmq.privacy import he, signing
from fedmq.privacy.sealing import agent_box_info, seal
from fedmq.protocol import topics, wire
from fedmq.protocol.chunking import single, split
from fedmq.runtime import config as cfgmod
from fedmq.runtime.mqtt_session import MqttSession
from fedmq.tools.fieldtest import oracle as oracle_mod
from fedmq.tools.local_cluster import TASK, Cluster, Observer, free_port

pytestmark = pytest.mark.slow


def _cluster(tmp_path, n_agents=3, rounds=2, min_agents=2) -> Cluster:
    cluster = Cluster(workdir=tmp_path, port=free_port(), n_agents=n_agents, rounds=rounds, chunk_size=16 * 1024,
                      round_timeout_s=60.0, selection_grace_s=5.0)
    for a in cluster.agent_ids:
        cluster.agent_overrides[a] = {"faults": cfgmod.FaultSettings(
            oracle_dir=tmp_path / "oracle", test_plaintext_dumps=True)}
    cluster.write_configs(min_agents=min_agents)
    return cluster


def _attacker(cluster: Cluster, name: str, *filters: str) -> MqttSession:
    s = MqttSession(cfgmod.BrokerEndpoint(port=cluster.port, persistent_session=False), name)
    for f in filters:
        s.subscribe(f)
    s.connect()
    return s


def _raw_send(s: MqttSession, topic: str, msg, *, rnd: int, sender: str, key=None, retain=False) -> None:
    """Publish an envelope claiming any sender, signed with any key (or none)."""
    s.publish(topic, wire.encode_envelope(single(msg, task=TASK, rnd=rnd, sender=sender, signing_key=key)),
              retain=retain).wait_for_publish(5)


def _exact(cluster: Cluster, obs: Observer, rnd: int, people: list[str]) -> None:
    ctx = oracle_mod.secret_context(cluster.workdir / "state/keyauthority")
    verdict = oracle_mod.check_round(ctx, cluster.workdir / "oracle", rnd, obs.results.get(rnd),
                                     obs.rounds[rnd].closed, 1e-6)
    assert verdict.ok, verdict.detail
    assert obs.rounds[rnd].closed.participants == people


def _wait_log(cluster: Cluster, name: str, text: str, obs: Observer, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if text in cluster.log_text(name):
            return
        obs.poll(timeout=0.2)
    raise AssertionError(f"{name} never logged {text!r}:\n{cluster.log_text(name)[-2000:]}")


def test_forged_key_grant_and_refusal_are_rejected(tmp_path):
    """14.1: the request's key and nonce travel in clear; a forger seals its own CKKS
    secret to them (and signs with its own key), or answers with a refusal."""
    cluster = _cluster(tmp_path)
    mallory_key = signing.load_or_create(tmp_path / "mallory.key")
    own_ctx = he.create_secret_context(he.CkksParams())
    own_keys = wire.encode_body(wire.SealedKeys(ckks=he.serialize_secret(own_ctx)))[1]
    try:
        cluster.start_broker()
        mallory = _attacker(cluster, "mallory", topics.all_enrollments(TASK))
        cluster.start_role("keyauthority")
        cluster.start_role("aggregator")
        for a in cluster.agent_ids:
            cluster.start_role(a)
        obs = Observer(cluster.port, collect_results=True)
        obs.connect()
        real_authority = signing.load_or_create(cluster.authority_key_file)  # stolen: but not the credential

        def forge_grant(agent: str, req: wire.EnrollRequest, key) -> None:
            """Mallory's own CKKS secret, sealed to the agent's request key seen in clear."""
            box = seal(req.public_key, own_keys, agent_box_info(TASK, agent))
            grant = wire.KeyGrant(request_nonce=req.nonce, ephemeral_key=box.ephemeral_key, aead_nonce=box.nonce,
                                  sealed_context=box.ciphertext, mac=os.urandom(32))
            _raw_send(mallory, topics.agent_key(TASK, agent, 0), grant, rnd=0, sender="keyauthority", key=key)

        forged = set()
        end = time.monotonic() + 60
        while len(forged) < 3 and time.monotonic() < end:
            try:
                msg = mallory.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            env = wire.decode_envelope(msg.payload, max_bytes=4096)
            req = wire.decode_body(env.kind, env.body)
            if env.sender == "agent-1" and "refusal" not in forged:
                _raw_send(mallory, topics.agent_key(TASK, "agent-1", 0),
                          wire.KeyRefused(request_nonce=req.nonce, reason="forged"), rnd=0, sender="keyauthority",
                          key=mallory_key)
                forged.add("refusal")
            elif env.sender == "agent-2" and "grant" not in forged:  # Mallory's own signing key
                forge_grant("agent-2", req, mallory_key)
                forged.add("grant")
            elif env.sender == "agent-3" and "mac" not in forged:  # the real signing key, no credential
                forge_grant("agent-3", req, real_authority)
                forged.add("mac")
        assert forged == {"refusal", "grant", "mac"}
        obs.wait_for("closed", 1, timeout=180)
        obs.wait_for("result", 1, timeout=30)
        _exact(cluster, obs, 1, cluster.agent_ids)  # agent-2 encrypted under the real key, not Mallory's
        assert cluster.procs["agent-1"].poll() is None, "a forged refusal must not stop the agent"
        assert "key_refused message not signed by the key authority (forged or altered)" in cluster.log_text("agent-1")
        assert "key_grant message not signed by the key authority (forged or altered)" in cluster.log_text("agent-2")
        agent3 = cluster.log_text("agent-3")
        assert "key grant's MAC does not prove knowledge of our credential: forged" in agent3 or \
            "key grant answers no request of ours" in agent3  # the real grant may have come first
        mallory.close()
        obs.close()
    finally:
        cluster.stop_all()


def test_downgraded_or_forged_starts_and_results_are_refused(tmp_path):
    """14.2 and 14.3: a start with p = 0 (forged, and signed by the real aggregator
    key — the malicious aggregator), forged results, and a validly signed result
    for round 2^40 that never started."""
    cluster = _cluster(tmp_path, rounds=2)
    mallory_key = signing.load_or_create(tmp_path / "mallory.key")
    aggregator_key = signing.load_or_create(tmp_path / "state/aggregator/signing.key")  # a malicious aggregator
    try:
        cluster.start_all()
        obs = Observer(cluster.port, collect_results=True)
        obs.connect()
        obs.wait_for("start", 1, timeout=120)
        mallory = _attacker(cluster, "mallory")
        downgrade = wire.RoundStart(model_version=0, deadline=time.time() + 60, selected=cluster.agent_ids, quorum=2,
                                    protection=wire.Protection(p=0.0))
        _raw_send(mallory, topics.round_start(TASK, 7), downgrade, rnd=7, sender="aggregator", key=mallory_key)
        _raw_send(mallory, topics.round_start(TASK, 8), downgrade, rnd=8, sender="aggregator", key=aggregator_key)
        lonely = wire.RoundStart(model_version=0, deadline=time.time() + 60, selected=["agent-1"], quorum=1)
        _raw_send(mallory, topics.round_start(TASK, 9), lonely, rnd=9, sender="aggregator", key=aggregator_key)
        fake = wire.Result(participants=["agent-1"], total_weight=1, n_params=10, n_encrypted=0, ciphertexts=[],
                           plain_avg=np.zeros(10, "<f4").tobytes())
        far = 1 << 40
        _raw_send(mallory, topics.round_result(TASK, far, 0), fake, rnd=far, sender="aggregator", key=mallory_key)
        _raw_send(mallory, topics.round_result(TASK, far + 1, 0), fake, rnd=far + 1, sender="aggregator",
                  key=aggregator_key)

        obs.wait_for("closed", 2, timeout=180)
        obs.wait_for("result", 2, timeout=30)
        _exact(cluster, obs, 1, cluster.agent_ids)
        _exact(cluster, obs, 2, cluster.agent_ids)  # every later start was still followed
        for a in cluster.agent_ids:
            log = cluster.log_text(a)
            assert "round_start message not signed by the aggregator (forged or altered)" in log
            assert "round 8 start asks for protection ckks p=0.0" in log and "protection downgrade" in log
            assert "round 9 selects 1 agent(s) with quorum 1; the task's policy needs at least 2" in log
            assert "result message not signed by the aggregator (forged or altered)" in log
            assert f"holding the round-{far + 1} result until that round's start arrives" in log
            assert "update sent" in log and "values encrypted" in log
            assert f"round {far + 1} result from" not in log  # never adopted
        mallory.close()
        obs.close()
    finally:
        cluster.stop_all()


def test_hostile_enrolled_agent_cannot_wedge_or_outweigh_the_round(tmp_path):
    """14.4 and 14.5: an agent that claims a million-chunk stream and then asks for a
    resend, declares 2^62 samples, or sends a 10-parameter update first — the round
    closes exactly over the honest agents, and the aggregator survives a restart."""
    cluster = _cluster(tmp_path, n_agents=3, rounds=2)
    try:
        cluster.start_broker()
        cluster.start_role("keyauthority")
        cluster.start_role("aggregator")
        honest = ["agent-1", "agent-2"]
        for a in honest:
            cluster.start_role(a)
        # agent-3 is the hostile one: it speaks for itself on a broker without ACLs.
        mallory = _attacker(cluster, "agent-3", topics.resend(TASK, 1, "agent-3"))
        _raw_send(mallory, topics.agent_status("agent-3"), wire.AgentStatus(state="online"), rnd=0, sender="agent-3",
                  retain=True)
        obs = Observer(cluster.port, collect_results=True)
        obs.connect()
        obs.wait_for("start", 1, timeout=120)
        assert "agent-3" in obs.rounds[1].selected
        keys = oracle_mod.secret_context(tmp_path / "state/keyauthority")  # an enrolled agent holds them

        def upload(update: wire.Update, chunk_size: int = 4096) -> None:
            kind, body = wire.encode_body(update)
            for env in split(kind, TASK, 1, "agent-3", body, chunk_size):
                mallory.publish(topics.update_chunk(TASK, 1, "agent-3", env.seq), wire.encode_envelope(env))

        tiny = split("update", TASK, 1, "agent-3", b"x", 1)[0]
        mallory.publish(topics.update_chunk(TASK, 1, "agent-3", 0),
                        wire.encode_envelope(dataclasses.replace(tiny, total=1 << 20)))
        upload(wire.Update(num_samples=1 << 62, n_params=10, n_encrypted=10,
                           ciphertexts=he.encrypt(keys, np.zeros(10))))
        upload(wire.Update(num_samples=5, n_params=10, n_encrypted=10, ciphertexts=he.encrypt(keys, np.ones(10))))
        # A 2 KiB first chunk of a 2^19-chunk stream (1 GiB: under the byte limit), then offline/online.
        big = split("update", TASK, 1, "agent-3", os.urandom(4096), 2048)[0]
        mallory.publish(topics.update_chunk(TASK, 1, "agent-3", 0),
                        wire.encode_envelope(dataclasses.replace(big, total=1 << 19)))
        _wait_log(cluster, "aggregator", "10 params, 10 encrypted", obs)  # held, or rejected if the honest came first
        _raw_send(mallory, topics.agent_status("agent-3"), wire.AgentStatus(state="offline"), rnd=0, sender="agent-3")
        _raw_send(mallory, topics.agent_status("agent-3"), wire.AgentStatus(state="online"), rnd=0, sender="agent-3")
        msg = mallory.inbox.get(timeout=30)
        assert len(msg.payload) < 1024, "a resend request must fit any broker's packet limit"
        req = wire.decode_body("resend", wire.decode_envelope(msg.payload, max_bytes=4096).body)
        assert req.ranges == [[1, 1 << 19]]
        _raw_send(mallory, topics.agent_status("agent-3"), wire.AgentStatus(state="offline"), rnd=0, sender="agent-3",
                  retain=True)

        obs.wait_for("closed", 1, timeout=120)
        obs.wait_for("result", 1, timeout=30)
        _exact(cluster, obs, 1, honest)
        log = cluster.log_text("aggregator")
        assert "carries 1 bytes; every chunk but the last carries at least 1024" in log
        assert "declares 4611686018427387904 samples, over the policy's max_samples bound of 1000000" in log
        assert "rejected agent-3's round-1 update: layout 10 params, 10 encrypted" in log or \
            "agent-3's update has layout 10 params, 10 encrypted" in log
        assert "participants ['agent-1', 'agent-2']" in log

        cluster.kill("aggregator", signal.SIGKILL)  # and it survives a restart after all that
        cluster.procs["aggregator"].wait(10)
        cluster.start_role("aggregator")
        obs.wait_for("closed", 2, timeout=180)
        obs.wait_for("result", 2, timeout=30)
        assert obs.rounds[2].closed.status == "aggregated"
        _exact(cluster, obs, 2, honest)
        mallory.close()
        obs.close()
    finally:
        cluster.stop_all()
