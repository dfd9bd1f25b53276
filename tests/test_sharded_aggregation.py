"""Sharded aggregation: the assignment rules, exact combining of partial sums, and
real rounds where shard workers fold their agents' updates and the root combines."""

from __future__ import annotations

import numpy as np
import pytest

from fedmq.privacy import he, protection, secure_aggregation
from fedmq.privacy.aggregation import RoundSum
from fedmq.protocol import shards, topics, wire
from fedmq.tools.fieldtest import oracle as oracle_mod
from fedmq.runtime import config as cfgmod
from tests.conftest import oracle, secret_context

AGENTS = [f"agent-{i}" for i in range(1, 8)]


# ---------------------------------------------------------------- assignment rules
def test_assignment_covers_the_selection_once_in_near_equal_ranges():
    plan = shards.assign(AGENTS, ["w1", "w2", "w3"])
    assert [s.count for s in plan] == [3, 2, 2]
    got = shards.members(list(reversed(AGENTS)), plan)  # the order of the selection does not matter
    assert got == {"w1": AGENTS[:3], "w2": AGENTS[3:5], "w3": AGENTS[5:]}
    assert shards.worker_of("agent-4", AGENTS, plan) == "w2"


def test_more_workers_than_agents_leaves_the_extra_workers_out():
    assert [(s.worker, s.count) for s in shards.assign(AGENTS[:2], ["w1", "w2", "w3"])] == [("w1", 1), ("w2", 1)]


def test_an_unsharded_round_has_no_workers():
    assert shards.assign(AGENTS, []) == []
    assert shards.members(AGENTS, []) == {}
    assert shards.worker_of("agent-1", AGENTS, []) is None


@pytest.mark.parametrize("plan, why", [
    ([wire.ShardRange(worker="w1", count=3)], "cover 3 agents"),
    ([wire.ShardRange(worker="w1", count=4), wire.ShardRange(worker="w1", count=3)], "named for two shards"),
])
def test_shards_that_do_not_describe_the_selection_are_refused(plan, why):
    with pytest.raises(shards.ShardError, match=why):
        shards.members(AGENTS, plan)


def test_shard_topics_parse_as_updates_addressed_to_their_worker():
    info = topics.parse(topics.shard_update_chunk("digits", "shard-2", 3, "agent-1", 0))
    assert (info.family, info.shard, info.round, info.agent) == ("update", "shard-2", 3, "agent-1")
    assert topics.parse(topics.update_chunk("digits", 3, "agent-1", 0)).shard is None
    part = topics.parse(topics.partial_chunk("digits", 3, "shard-2", 1))
    assert (part.family, part.agent, part.seq) == ("partial", "shard-2", 1)


# ---------------------------------------------------------------- combining is exact
def _ckks_updates(secret, rng, n=3, size=5000):
    ups = [rng.normal(size=size) for _ in range(n)]
    mask = np.zeros(size, dtype=bool)
    mask[::3] = True  # p ~ 1/3: a ciphertext part and a float part
    return ups, [protection.protect_ckks(secret, u, 5 + i, mask, "float32", n, None) for i, u in enumerate(ups)]


def test_partial_sums_combine_to_the_single_aggregator_sum_ckks():
    secret = he.create_secret_context(he.CkksParams())
    public = he.load_context(he.serialize_public(secret))
    _, updates = _ckks_updates(secret, np.random.default_rng(1))
    whole, left, right = (RoundSum(quantized=False, ckks=public) for _ in range(3))
    for u in updates:
        whole.fold(u)
    left.fold(updates[0])
    for u in updates[1:]:
        right.fold(u)
    # Through the wire encoding a worker sends and the root reads.
    combined = RoundSum(quantized=False, ckks=public)
    for part in (left, right, RoundSum(quantized=False, ckks=public)):  # an empty shard adds nothing
        combined.merge(RoundSum.from_stored(part.meta_bytes(), list(part.serialized_ciphertexts()), ckks=public))
    n_enc = updates[0].n_encrypted
    a = he.decrypt(secret, he.serialize_all(combined.acc), n_enc)
    b = he.decrypt(secret, he.serialize_all(whole.acc), n_enc)
    assert np.abs(a - b).max() < 1e-6
    assert np.array_equal(combined.plain, whole.plain)


def test_partial_sums_combine_exactly_for_integer_codes():
    rng = np.random.default_rng(2)
    whole, left, right = (RoundSum(quantized=True) for _ in range(3))
    codes = [[rng.integers(0, 1 << 16, size=n, dtype=np.uint64) for n in (10, 7)] for _ in range(4)]
    updates = [wire.Update(num_samples=1, n_params=17, n_encrypted=0, ciphertexts=[],
                           codes=[c.astype("<u2").tobytes() for c in cs], code_widths=[2, 2]) for cs in codes]
    for i, u in enumerate(updates):
        whole.fold(u)
        (left if i < 2 else right).fold(u)
    combined = RoundSum(quantized=True)
    for part in (left, right):
        combined.merge(RoundSum.from_stored(part.meta_bytes(), [], bfv=None))
    assert all(np.array_equal(a, b) for a, b in zip(combined.codes, whole.codes))


def test_sums_of_different_layouts_are_not_combined():
    a, b = RoundSum(quantized=True), RoundSum(quantized=True)
    a.fold(wire.Update(num_samples=1, n_params=4, n_encrypted=0, ciphertexts=[], codes=[b"\0" * 8], code_widths=[2]))
    b.fold(wire.Update(num_samples=1, n_params=5, n_encrypted=0, ciphertexts=[], codes=[b"\0" * 10],
                       code_widths=[2]))
    with pytest.raises(ValueError, match="cannot be combined"):
        a.merge(b)


# ---------------------------------------------------------------- real rounds
RANGE = 1.75
PLAN = cfgmod.QuantizationSettings(layers=[
    cfgmod.LayerQuantSettings(bits=8, mode="symmetric", rounding="stochastic", lo=-RANGE, hi=RANGE)],
    n_ref=480, max_agents=8)


def _exact(cluster, obs, rnd, prot):
    if prot.scheme == "ckks":
        n = len(obs.rounds[rnd].selected)  # a masked float part: its fixed point's resolution, per agent
        tolerance = 1e-6 + (n * 2.0 ** -secure_aggregation.frac_bits(n, 1_000_000) if prot.secure_masking else 0)
        verdict = oracle_mod.check_round(secret_context(cluster), cluster.workdir / "oracle", rnd,
                                         obs.results.get(rnd), obs.rounds[rnd].closed, tolerance)
        assert verdict.ok, verdict.detail
        return
    # Quantized: the model each agent rebuilt from the unmasked integer sums (its next
    # round's base) is the weighted FedAvg within one quantization step per agent.
    agents = obs.rounds[rnd].closed.participants
    dumps = [oracle(cluster, a, f"round{rnd}") for a in agents]
    ns = [int(d["num_samples"]) for d in dumps]
    truth = sum(d["weights"] * n for d, n in zip(dumps, ns)) / sum(ns)
    bound = len(agents) * (2 * RANGE / 254) * PLAN.n_ref / sum(ns)
    for a in agents:
        assert np.abs(oracle(cluster, a, f"round{rnd + 1}")["base"] - truth).max() <= bound


@pytest.mark.slow
@pytest.mark.parametrize("prot", [
    wire.Protection(scheme="ckks", p=1.0),
    pytest.param(wire.Protection(scheme="quantize", p=0.0, mode="random", secure_masking=True), marks=pytest.mark.long),
    pytest.param(wire.Protection(scheme="quantize+he", p=0.3, mode="random"), marks=pytest.mark.long),
    pytest.param(wire.Protection(scheme="ckks", p=0.3, mode="random", secure_masking=True), marks=pytest.mark.long),
], ids=["ckks", "quantize-masked", "quantize+he", "ckks-selective-masked"])
def test_two_shard_workers_fold_and_the_root_combines_exactly(cluster_factory, prot):
    with cluster_factory(n_agents=4, rounds=2, shard_workers=2, protection=prot, quantization=PLAN) as (cluster, obs):
        for rnd in (1, 2):
            obs.wait_for("result", rnd, timeout=150)
            obs.wait_for("closed", rnd, timeout=30)
            assert obs.rounds[rnd].closed.participants == cluster.agent_ids
        _exact(cluster, obs, 1, prot)
        root = cluster.log_text("aggregator")
        assert "combined shard-1's partial sum (2 update(s)" in root
        assert "combined shard-2's partial sum (2 update(s)" in root
        assert "folded agent-" not in root  # the root never folds (or sees) an update
        assert "folded agent-1's update" in cluster.log_text("shard-1")
        assert "folded agent-3's update" in cluster.log_text("shard-2")


@pytest.mark.long
def test_a_shard_worker_killed_mid_round_resumes_and_the_round_is_exact(cluster_factory):
    prot = wire.Protection(scheme="ckks", p=1.0)
    with cluster_factory(n_agents=4, rounds=2, shard_workers=2, protection=prot, watch="+",
                         slow_agents={"agent-2": 0.4}) as (cluster, obs):
        # shard-1 folds agent-1 and agent-2; agent-2 uploads slowly. Kill shard-1 once it
        # has folded agent-1's update and agent-2's upload is under way.
        def worker_folded_one() -> bool:
            return "folded agent-1's update" in cluster.log_text("shard-1") and \
                obs.upload_progress.get((1, "agent-2"), [0, 1])[0] > 0

        killed = []

        def kill_shard1(event, rnd):
            if not killed and rnd == 1 and worker_folded_one():
                cluster.kill("shard-1")
                cluster.procs["shard-1"].wait(10)
                killed.append(rnd)
                cluster.start_role("shard-1")  # same state directory: resumes from its store

        obs.wait_for("closed", 1, timeout=180, on_event=kill_shard1)
        assert killed, "shard-1 was never killed mid-round"
        closed = obs.rounds[1].closed
        assert closed.status == "aggregated" and closed.participants == cluster.agent_ids, closed.reason
        obs.wait_for("result", 1, timeout=30)
        _exact(cluster, obs, 1, prot)
        assert "resumed round 1 after a restart: 1 update(s) already folded ['agent-1']" in \
            cluster.log_text("shard-1")
        obs.wait_for("closed", 2, timeout=150)
        obs.wait_for("result", 2, timeout=30)
        _exact(cluster, obs, 2, prot)
