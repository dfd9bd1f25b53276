"""Secure masking across real processes: the aggregator sums masked uploads, the
key authority unmasks the survivors' sum, and the model every agent rebuilds is
the FedAvg of the survivors — with an agent killed before its upload and another
killed after it."""

import queue
import time

import numpy as np
import pytest

from fedmq.privacy import secure_aggregation, signing
from fedmq.protocol import topics, wire
from fedmq.runtime import config as cfgmod
from fedmq.runtime.mqtt_session import MqttSession
from fedmq.tools.local_cluster import TASK
from tests.conftest import oracle

pytestmark = pytest.mark.slow
RANGE = 1.75
PLAN = cfgmod.QuantizationSettings(layers=[
    cfgmod.LayerQuantSettings(bits=8, mode="symmetric", rounding="stochastic", lo=-RANGE, hi=RANGE)],
    n_ref=480, max_agents=4)


def _fedavg_and_bound(cluster, rnd, agents):
    dumps = [oracle(cluster, a, f"round{rnd}") for a in agents]
    ns = [int(d["num_samples"]) for d in dumps]
    truth = sum(d["weights"] * n for d, n in zip(dumps, ns)) / sum(ns)
    step = 2 * RANGE / 254
    for d, n in zip(dumps, ns):  # the bound holds only without clipping
        assert np.abs((d["weights"] - d["base"]) * n / PLAN.n_ref).max() < RANGE
    return truth, len(agents) * step * PLAN.n_ref / sum(ns)


def test_masked_quantize_exact_over_survivors_with_dropouts(cluster_factory):
    prot = wire.Protection(scheme="quantize", p=0.0, mode="random", secure_masking=True)
    slow = {"agent-2": 0.4, "agent-4": 0.4}
    with cluster_factory(n_agents=4, rounds=4, protection=prot, quantization=PLAN, watch="+", chunk_size=1024,
                         slow_agents=slow) as (cluster, obs):
        obs.wait_for("closed", 1, timeout=120)
        assert obs.rounds[1].closed.participants == ["agent-1", "agent-2", "agent-3", "agent-4"]

        def kill_agent4_before_upload(event, rnd):  # round 2: agent-4 dies while training / starting to upload
            if (event, rnd) == ("start", 2):
                cluster.kill("agent-4")

        obs.wait_for("closed", 2, timeout=120, on_event=kill_agent4_before_upload)
        closed = obs.rounds[2].closed
        assert closed.status == "aggregated", closed.reason
        assert closed.participants == ["agent-1", "agent-2", "agent-3"] and closed.dropped == ["agent-4"]

        def kill_agent3_after_upload(event, rnd):  # round 3: agent-3 dies once its upload is complete
            seen, total = obs.upload_progress.get((3, "agent-3"), [0, 1])
            if event == "upload" and rnd == 3 and seen == total and cluster.procs["agent-3"].poll() is None:
                cluster.kill("agent-3")

        obs.wait_for("closed", 3, timeout=120, on_event=kill_agent3_after_upload)
        closed = obs.rounds[3].closed
        assert cluster.procs["agent-3"].poll() is not None, "agent-3 must have been killed"
        assert closed.status == "aggregated", closed.reason
        assert closed.participants == ["agent-1", "agent-2", "agent-3"]
        obs.wait_for("closed", 4, timeout=120)
        _lying_aggregator_is_refused(cluster)
    for rnd, survivors, readers in ((1, ["agent-1", "agent-2", "agent-3", "agent-4"], ["agent-1", "agent-2"]),
                                    (2, ["agent-1", "agent-2", "agent-3"], ["agent-1", "agent-3"]),
                                    (3, ["agent-1", "agent-2", "agent-3"], ["agent-1", "agent-2"])):
        truth, bound = _fedavg_and_bound(cluster, rnd, survivors)
        for a in readers:  # the model the agent rebuilt from the unmasked sum is its next base
            rebuilt = oracle(cluster, a, f"round{rnd + 1}")["base"]
            assert np.abs(rebuilt - truth).max() <= bound, (rnd, a)
    ka = cluster.log_text("keyauthority")
    assert "unmasked round 2 for 3 survivor(s) of 4 selected" in ka
    assert "unmasked round 3 for 3 survivor(s) of 3 selected" in ka
    # masked codes travel in the ring of their sum: 2 bytes per parameter
    assert obs.rounds[1].closed.bytes_received / 4 / truth.size < 2.2


def _lying_aggregator_is_refused(cluster) -> None:
    """With the aggregator's own signing key, claim that agent-3 — whose round-3 update
    was summed — dropped: the correction would reveal its pairwise masks, and with
    the first answer its self mask. The key authority refuses the second claim."""
    key = signing.load_or_create(cluster.workdir / "state/aggregator/signing.key")
    liar = MqttSession(cfgmod.BrokerEndpoint(port=cluster.port, persistent_session=False), "aggregator-liar",
                       signing_key=key)
    liar.subscribe(topics.mask_correction(TASK, 3, 0))
    liar.connect()
    try:
        lanes = [[1, 2]]  # the shapes do not matter: the claim is refused before any mask is computed
        liar.send(topics.mask_request(TASK, 3),
                  wire.MaskRequest(selected=["agent-1", "agent-2", "agent-3"], survivors=["agent-1", "agent-2"],
                                   lanes=lanes), task=TASK, rnd=3)
        end = time.monotonic() + 20
        while True:
            msg = liar.inbox.get(timeout=max(0.1, end - time.monotonic()))
            env = wire.decode_envelope(msg.payload, max_bytes=1 << 20)
            if env.sender == "keyauthority":
                break
        assert env.kind == "mask_refused"
        assert "already unmasked" in wire.decode_body(env.kind, env.body).reason
    except queue.Empty:
        pytest.fail("the key authority did not answer the second claim")
    finally:
        liar.close()
    assert "refused to unmask round 3" in cluster.log_text("keyauthority")


@pytest.mark.long  # real processes, ~30 s: CI's long pass runs it
def test_masked_float_part_of_selective_ckks(cluster_factory):
    prot = wire.Protection(scheme="ckks", p=0.3, mode="random", seed=11, secure_masking=True)
    with cluster_factory(n_agents=3, rounds=2, protection=prot) as (cluster, obs):
        obs.wait_for("closed", 2, timeout=120)
        assert obs.rounds[1].closed.status == "aggregated"
    agents = ["agent-1", "agent-2", "agent-3"]
    dumps = [oracle(cluster, a, "round1") for a in agents]
    ns = [int(d["num_samples"]) for d in dumps]
    truth = sum(d["weights"] * n for d, n in zip(dumps, ns)) / sum(ns)
    bits = secure_aggregation.frac_bits(3, 1_000_000)
    bound = 3 * 2.0 ** -bits / sum(ns) + 1e-6
    for a in agents:
        rebuilt = oracle(cluster, a, "round2")["base"]
        assert np.abs(rebuilt - truth).max() <= bound
    assert "sum unmasked" in cluster.log_text("aggregator")
