"""Secure masking, rule by rule: masks cancel, recovery corrects dropouts exactly,
a lying aggregator gets no single update, a masked upload reads as noise."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

from fedmq.privacy import secure_aggregation as sa
from keyauthority.mask_ledger import MaskLedger, RecoveryRefused

TASK = "t"


def _fleet(n: int):
    master = os.urandom(32)
    ids = [f"agent-{i:02d}" for i in range(n)]
    keys = {a: sa.agent_private_key(master, TASK, a) for a in ids}
    roster = {a: sa.public_bytes(k) for a, k in keys.items()}
    return ids, keys, roster


def _upload(me, keys, roster, selected, rnd, values, lanes):
    return sa.mask(values, sa.agent_mask(me, keys[me], roster, selected, TASK, rnd, lanes))


@pytest.mark.parametrize("n", [2, 3, 7, 20])
def test_integer_masks_cancel_exactly(n: int) -> None:
    ids, keys, roster = _fleet(n)
    lanes = [sa.Lane(300, 2), sa.Lane(50, 4), sa.Lane(0, 2)]
    rng = np.random.default_rng(n)
    values = {a: [rng.integers(0, 256, lane.length).astype(lane.dtype) for lane in lanes] for a in ids}
    sums = [np.zeros(lane.length, dtype=np.int64) for lane in lanes]
    for a in ids:
        for s, up in zip(sums, _upload(a, keys, roster, ids, 5, values[a], lanes)):
            s += up.astype(np.int64)
    corr = sa.correction(keys, ids, ids, TASK, 5, lanes)
    got = sa.unmask(sums, lanes, corr)
    for lane_i, lane in enumerate(lanes):
        want = sum(values[a][lane_i].astype(np.int64) for a in ids)
        assert np.array_equal(got[lane_i].astype(np.int64), want)


@pytest.mark.parametrize("n", [2, 5, 20])
def test_pairwise_masks_alone_cancel(n: int) -> None:
    """Without the self masks (the correction for a full round is exactly their sum),
    the pairwise terms sum to zero."""
    ids, keys, roster = _fleet(n)
    lanes = [sa.Lane(64, 4)]
    total = np.zeros(64, dtype=np.uint32)
    selfs = np.zeros(64, dtype=np.uint32)
    for a in ids:
        with np.errstate(over="ignore"):
            total += sa.agent_mask(a, keys[a], roster, ids, TASK, 1, lanes)[0]
            selfs += sa.expand(sa.self_seed(keys[a], TASK, 1), lanes)[0]
    assert np.array_equal(total, selfs)


@pytest.mark.parametrize("n,drop", [(3, 1), (10, 3), (20, 6)])
def test_fixed_point_sum_over_survivors_within_the_encoding_step(n: int, drop: int) -> None:
    ids, keys, roster = _fleet(n)
    rng = np.random.default_rng(7)
    weights = {a: rng.normal(0, 0.5, 400) for a in ids}
    samples = {a: int(rng.integers(1, 500)) for a in ids}
    bits = sa.frac_bits(n, 1000)
    lanes = [sa.Lane(400, sa.PLAIN_WIDTH)]
    survivors = ids[drop:]
    acc = np.zeros(400, dtype=np.int64)
    for a in survivors:  # the dropped agents never upload
        ring, clipped = sa.encode_fixed(weights[a], samples[a], bits, rng)
        assert clipped == 0
        acc += _upload(a, keys, roster, ids, 9, [ring], lanes)[0].astype(np.int64)
    (ring_sum,) = sa.unmask([acc], lanes, sa.correction(keys, ids, survivors, TASK, 9, lanes))
    got = sa.decode_fixed(ring_sum, bits)
    want = sum(samples[a] * weights[a] for a in survivors)
    assert np.max(np.abs(got - want)) <= len(survivors) * 2.0 ** -bits


def test_wrong_survivor_set_leaves_garbage() -> None:
    """The correction is specific to its set: claiming someone dropped who uploaded
    leaves the sum masked (the check that recovery is not a no-op)."""
    ids, keys, roster = _fleet(4)
    lanes = [sa.Lane(100, 2)]
    vals = [np.full(100, 3, dtype=np.uint16)]
    acc = np.zeros(100, dtype=np.int64)
    for a in ids:
        acc += _upload(a, keys, roster, ids, 2, vals, lanes)[0].astype(np.int64)
    (wrong,) = sa.unmask([acc], lanes, sa.correction(keys, ids, ids[:3], TASK, 2, lanes))
    assert not np.array_equal(wrong, np.full(100, 12, dtype=np.uint16))


def test_lying_aggregator_cannot_unmask_a_live_agent() -> None:
    """Claiming live agent-00 dropped reveals its pairwise masks; its self mask stays
    on, so upload - pairwise masks is still not its values."""
    ids, keys, roster = _fleet(3)
    lanes = [sa.Lane(2000, 2)]
    secret = [np.full(2000, 42, dtype=np.uint16)]
    up = _upload(ids[0], keys, roster, ids, 4, secret, lanes)[0]
    # everything the lie reveals: the correction for the others, i.e. their masks with agent-00
    corr = sa.correction(keys, ids, ids[1:], TASK, 4, lanes)[0]
    others_self = [sa.expand(sa.self_seed(keys[a], TASK, 4), lanes)[0] for a in ids[1:]]
    with np.errstate(over="ignore"):
        pairwise_with_00 = corr - others_self[0] - others_self[1]  # = -(agent-00's pairwise mask)
        guess = up + pairwise_with_00
    assert np.mean(guess == 42) < 0.01  # still the self mask: noise
    ledger = MaskLedger(min_survivors=2)
    ledger.check(4, ids, ids[1:])
    with pytest.raises(RecoveryRefused, match="already unmasked"):
        ledger.check(4, ids, ids)  # the second claim that would reveal agent-00's self mask


def test_ledger_rules() -> None:
    ledger = MaskLedger(min_survivors=3)
    sel = ["a", "b", "c", "d"]
    with pytest.raises(RecoveryRefused, match="fewer than 3"):
        ledger.check(1, sel, ["a", "b"])
    with pytest.raises(RecoveryRefused, match="not selected"):
        ledger.check(1, sel, ["a", "b", "x"])
    with pytest.raises(RecoveryRefused, match="twice"):
        ledger.check(1, sel, ["a", "b", "b"])
    assert ledger.check(1, sel, ["c", "a", "b"]) == ("a", "b", "c")
    assert ledger.check(1, sel, ["a", "b", "c"]) == ("a", "b", "c")  # a restarted aggregator asks again
    with pytest.raises(RecoveryRefused):
        ledger.check(1, sel, ["a", "b", "c", "d"])
    assert MaskLedger(2).check(7, ["a", "b"], ["a", "b"])  # never fewer than two, whatever the policy
    with pytest.raises(RecoveryRefused):
        MaskLedger(1).check(1, ["a", "b"], ["a"])
    again = MaskLedger.from_json(ledger.to_json(), 3)  # what the key authority reloads after a restart
    with pytest.raises(RecoveryRefused):
        again.check(1, sel, ["b", "c", "d"])


def test_masked_upload_reads_as_uniform_noise() -> None:
    """Smoke test of the aggregator's view: byte histogram of one masked upload of an
    all-zero update is flat (chi-square) and the bytes do not compress."""
    ids, keys, roster = _fleet(5)
    lanes = [sa.Lane(50_000, 2)]
    up = _upload(ids[2], keys, roster, ids, 3, [np.zeros(50_000, dtype=np.uint16)], lanes)[0].tobytes()
    counts = np.bincount(np.frombuffer(up, dtype=np.uint8), minlength=256)
    expected = len(up) / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 340  # 255 degrees of freedom: p > 0.0002
    assert len(zlib.compress(up, 9)) > 0.99 * len(up)


def test_fixed_point_refuses_what_cannot_fit() -> None:
    with pytest.raises(sa.MaskingError, match="max_samples"):
        sa.frac_bits(1000, 1 << 30)
    assert sa.frac_bits(10, 1) >= 20
