import pytest

from aggregator.round_state import Outcome, Rejected, RoundState


def _round(selected=("a", "b", "c"), quorum=2, deadline=100.0):
    return RoundState(round=1, model_version=0, selected=frozenset(selected), quorum=quorum, deadline=deadline)


def test_early_close_when_everyone_reported():
    st = _round()
    for i, a in enumerate("abc"):
        assert st.decide(10) is None
        st.record(a, 10 * (i + 1), now=10)
    d = st.decide(10)
    assert d.outcome is Outcome.AGGREGATE and st.total_weight == 60


def test_offline_agent_closes_round_early_and_reweights():
    st = _round()
    st.record("a", 30, now=1)
    st.record("b", 10, now=1)
    assert st.decide(2) is None
    st.mark_offline("c", now=2)
    d = st.decide(2)
    assert d.outcome is Outcome.AGGREGATE
    assert st.total_weight == 40 and st.dropped == ["c"]


def test_reconnected_agent_is_waited_for_again():
    st = _round()
    st.record("a", 1, now=1)
    st.record("b", 1, now=1)
    st.mark_offline("c", now=2)
    st.mark_online("c")
    assert st.decide(2) is None


def test_deadline_with_and_without_quorum():
    st = _round()
    st.record("a", 1, now=1)
    assert st.decide(99) is None
    assert st.decide(100).outcome is Outcome.ABORT
    st.record("b", 1, now=50)
    assert st.decide(100).outcome is Outcome.AGGREGATE


def test_short_of_quorum_waits_for_offline_agents_until_the_deadline():
    st = _round(quorum=3)
    st.record("a", 1, now=1)
    st.mark_offline("b", now=2)
    st.mark_offline("c", now=2)
    assert st.decide(2) is None  # they may come back (a broker restart takes everyone offline)
    assert st.decide(100).outcome is Outcome.ABORT
    st2 = _round(quorum=2)
    st2.mark_offline("b", now=2)
    st2.mark_offline("c", now=2)
    st2.mark_online("b")
    st2.record("a", 1, now=3)
    st2.record("b", 1, now=4)
    assert st2.decide(5).outcome is Outcome.AGGREGATE  # b came back and delivered; c is offline


@pytest.mark.parametrize("agent, now, closed, reason", [
    ("z", 1, False, "not selected"),
    ("a", 101, False, "after the deadline"),
    ("a", 1, True, "closed"),
])
def test_rejections(agent, now, closed, reason):
    st = _round()
    st.closed = closed
    with pytest.raises(Rejected, match=reason):
        st.record(agent, 1, now=now)


def test_duplicate_and_bad_weight():
    st = _round()
    st.record("a", 5, now=1)
    with pytest.raises(Rejected, match="already contributed"):
        st.record("a", 5, now=1)
    with pytest.raises(Rejected, match="positive"):
        st.record("b", 0, now=1)
    assert st.weights == {"a": 5}


def test_impossible_quorum():
    with pytest.raises(ValueError):
        _round(quorum=4)


def test_overprovisioned_selection(tmp_path):
    from aggregator.service import Aggregator
    from fedmq.runtime import config as cfgmod

    online = [f"a{i}" for i in range(20)]
    agg = Aggregator(cfgmod.AggregatorConfig(state_dir=tmp_path, min_agents=4, overprovision=1.5))
    first = agg._select(online, cap=1000, rnd=1)
    assert len(first) == 6 and set(first) <= set(online)
    assert agg._select(online, cap=1000, rnd=1) == first  # deterministic per round
    assert agg._select(online, cap=1000, rnd=2) != first  # re-sampled each round
    assert agg._select(online[:3], cap=1000, rnd=1) == online[:3]  # fewer online: take them all
    assert len(agg._select(online, cap=5, rnd=1)) == 5
    everyone = Aggregator(cfgmod.AggregatorConfig(state_dir=tmp_path / "b", min_agents=4))
    assert everyone._select(online, cap=1000, rnd=1) == online


def test_offline_agents_get_a_grace_period_to_reconnect():
    st = RoundState(round=1, model_version=0, selected=frozenset("abc"), quorum=2, deadline=100.0,
                    offline_grace_s=5.0)
    st.record("a", 1, now=1)
    st.record("b", 1, now=1)
    st.mark_offline("c", now=10)
    st.mark_offline("c", now=12)  # a repeated last will does not restart the clock
    assert st.decide(14) is None  # c may be back in a moment (broker restart, Wi-Fi)
    assert st.decide(15).outcome is Outcome.AGGREGATE


def test_withdrawn_agent_is_a_dropout_at_once_and_a_reconnect_does_not_undo_it():
    """An agent whose workload failed (or whose complete update was refused) says so:
    no grace period, no deadline wait; a later valid update would still count."""
    st = RoundState(round=1, model_version=0, selected=frozenset("abc"), quorum=2, deadline=100.0,
                    offline_grace_s=30.0)
    st.record("a", 1, now=1)
    st.record("b", 1, now=1)
    st.withdraw("c")
    st.mark_online("c")  # its status after a reconnect: still sitting the round out
    d = st.decide(2)
    assert d.outcome is Outcome.AGGREGATE and st.dropped == ["c"]
    late = _round()
    late.withdraw("c")
    late.record("c", 5, now=3)  # a valid update that still arrives counts
    assert late.weights == {"c": 5} and "c" not in late.offline
    late.withdraw("a")
    late.withdraw("zzz")  # not selected: ignored
    assert "zzz" not in late.offline
