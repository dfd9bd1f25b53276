"""Key distribution over the real broker: the aggregator's context is public-only,
the secret context travels sealed, a wrong credential gets no key."""

import queue
import time

import numpy as np
import pytest

from fedmq.runtime import config as cfgmod
from fedmq.privacy import he
from fedmq.protocol import topics, wire
from fedmq.protocol.chunking import Reassembler
from fedmq.runtime.mqtt_session import MqttSession
from tests.conftest import secret_context

pytestmark = pytest.mark.slow
TASK = "digits"


def _collect(session, want_kind, timeout=60.0):
    chunks = Reassembler(max_stream_bytes=1 << 26)
    got = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            msg = session.inbox.get(timeout=0.2)
        except queue.Empty:
            if got:
                return got
            continue
        env = wire.decode_envelope(msg.payload, max_bytes=1 << 26)
        if env.kind == want_kind:
            try:
                done = chunks.add(env)
            except wire.WireError:  # a retained message delivered again
                continue
            if done:
                got.append((env.sender, msg.topic, wire.decode_body(done.kind, done.body), msg.payload))
    return got


def test_public_context_sealed_grants_and_wrong_credential(cluster_factory):
    overrides = {"agent-3": {"credential": "not-the-right-credential"}}
    with cluster_factory(n_agents=3, rounds=1, overrides=overrides, target_agents=2) as (cluster, obs):
        eve = MqttSession(cfgmod.BrokerEndpoint(port=cluster.port), "eavesdropper")
        eve.subscribe(topics.all_public_context(TASK))
        eve.connect()
        (_, _, public, _), = _collect(eve, "public_context")
        ctx = he.load_context(public.context)
        assert not ctx.is_private()

        # The agent with a wrong credential is refused and exits with a clear error.
        rc = cluster.procs["agent-3"].wait(timeout=120)
        assert rc == 2
        assert "refused enrollment" in cluster.log_text("agent-3")
        assert "refused enrollment of 'agent-3'" in cluster.log_text("keyauthority")

        obs.wait_for("closed", 1, timeout=120)
        closed = obs.rounds[1].closed
        assert closed.participants == ["agent-1", "agent-2"]  # agent-3 never got a key, never joined

        # Whatever the broker relayed to agents is sealed: the secret key never appears.
        secret = he.serialize_secret(secret_context(cluster))
        eve2 = MqttSession(cfgmod.BrokerEndpoint(port=cluster.port), "eavesdropper-2")
        eve2.subscribe("keys/#")
        eve2.connect()
        retained = _collect(eve2, "public_context", timeout=5)
        assert retained and all(secret[-4096:] not in p for *_, p in retained)

        # The result on the broker cannot be decrypted with what the aggregator holds.
        obs.wait_for("result", 1, timeout=30)
        with pytest.raises(he.HEError, match="no secret key"):
            he.decrypt(ctx, obs.results[1].ciphertexts, obs.results[1].n_params)
        avg = he.decrypt(secret_context(cluster), obs.results[1].ciphertexts, obs.results[1].n_params)
        assert np.isfinite(avg).all()
        eve.close()
        eve2.close()
