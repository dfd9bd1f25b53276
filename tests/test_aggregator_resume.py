"""The crash window between the last chunk reaching disk and the fold committing:
a restarted aggregator must fold that update from disk — not forget it as 'complete'
— and fold it exactly once."""

import time

import numpy as np

from aggregator.round_state import RoundState
from aggregator.service import Aggregator
from fedmq.privacy import he, protection
from fedmq.protocol import wire
from fedmq.privacy.aggregation import RoundSum
from fedmq.protocol.chunking import split
from fedmq.runtime.config import AggregatorConfig


def test_update_whole_on_disk_but_not_folded_is_folded_after_restart(tmp_path):
    secret = he.create_secret_context(he.CkksParams())
    public = he.load_context(he.serialize_public(secret))
    cfg = AggregatorConfig(state_dir=tmp_path, min_agents=1)
    weights = np.linspace(-1, 1, 5000)
    update = protection.protect_ckks(secret, weights, 40, np.ones(weights.size, dtype=bool), "float32", 2, None)
    kind, body = wire.encode_body(update)

    first = Aggregator(cfg)
    first.ctx = public
    first.state = RoundState(1, 0, frozenset({"agent-1", "agent-2"}), 1, time.time() + 60)
    first.store.open(first.state)
    for env in split(kind, "digits", 1, "agent-1", body, 16 * 1024):
        first.chunks.parts.put(env)  # on disk, then kill -9 before the fold
    del first

    second = Aggregator(cfg)
    second.ctx = public
    assert second._resume()
    assert second.state.weights == {"agent-1": 40}
    total = he.decrypt(secret, he.serialize_all(second.sum.acc), weights.size)
    assert np.abs(total / 40 - weights).max() < 1e-6

    third = Aggregator(cfg)  # and once more: folded exactly once, its chunks gone
    third.ctx = public
    assert third._resume()
    assert third.state.weights == {"agent-1": 40}
    resumed = RoundSum.from_stored(third.store.load()[2], third.store.sum_ciphertexts(), ckks=public)
    assert np.abs(he.decrypt(secret, he.serialize_all(resumed.acc), weights.size) / 40 - weights).max() < 1e-6
    assert third.store.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0] == 0


def test_a_ciphertext_failing_half_way_leaves_the_committed_sum(tmp_path):
    import dataclasses

    import pytest

    secret = he.create_secret_context(he.CkksParams())
    public = he.load_context(he.serialize_public(secret))
    agg = Aggregator(AggregatorConfig(state_dir=tmp_path, min_agents=1))
    agg.ctx = public
    agg.state = RoundState(1, 0, frozenset({"agent-1", "agent-2"}), 1, time.time() + 60)
    agg.store.open(agg.state)
    agg.sum = RoundSum(quantized=False, ckks=public)
    weights = np.linspace(-1, 1, 9000)  # 5 ciphertexts
    good = protection.protect_ckks(secret, weights, 10, np.ones(weights.size, dtype=bool), "float32", 2, None)
    bad = protection.protect_ckks(secret, weights, 10, np.ones(weights.size, dtype=bool), "float32", 2, None)
    bad = dataclasses.replace(bad, ciphertexts=bad.ciphertexts[:3] + [b"garbage"] + bad.ciphertexts[4:])
    for sender, update in (("agent-1", good), ("agent-2", bad)):
        kind, body = wire.encode_body(update)
        for env in split(kind, "digits", 1, sender, body, 64 * 1024):
            try:
                agg._on_update_chunk(env)
            except he.HEError as exc:
                assert "ciphertext 3" in str(exc)
    assert agg.state.weights == {"agent-1": 10}
    total = he.decrypt(secret, he.serialize_all(agg.sum.acc), weights.size)
    assert np.abs(total / 10 - weights).max() < 1e-6  # agent-2's first three ciphertexts are not in it
    with pytest.raises(he.HEError):
        agg.sum.fold(dataclasses.replace(bad), consume=True)


def test_finished_task_says_what_to_do(tmp_path, caplog):
    """Issue 19: re-running a finished aggregator no longer says "resuming at round 6"
    and silently exits; it says the task is done and how to go on or start over."""
    import json
    import logging

    (tmp_path / "aggregator_state.json").write_text(json.dumps({"next_round": 6, "model_version": 5,
                                                                "rounds_done": 5}))
    agg = Aggregator(AggregatorConfig(state_dir=tmp_path, rounds=5))
    with caplog.at_level(logging.WARNING, logger="fedmq.aggregator"):
        agg.run()
    assert "already ran its 5 training round(s)" in caplog.text and "raise `rounds`" in caplog.text
