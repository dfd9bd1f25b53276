"""The inbound backlog beyond a byte budget waits on disk, in order, privately."""

import queue
import stat

import pytest

from fedmq.runtime.mqtt_session import Inbound, SpillingInbox


def test_backlog_beyond_budget_spills_to_disk_in_order(tmp_path):
    spool = tmp_path / "spool"
    box = SpillingInbox(max_bytes=2500, spool_dir=spool)
    msgs = [Inbound(f"t/{i}", bytes([i]) * 1000, False, i, 1) for i in range(10)]
    for m in msgs:
        box.put(m)
    files = sorted(spool.glob("*.msg"))
    assert box.spilled == 8 and len(files) == 8  # two fit in 2500 bytes of memory
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert [box.get(timeout=1) for _ in range(10)] == msgs  # same order, payloads restored
    assert not list(spool.glob("*.msg"))
    with pytest.raises(queue.Empty):
        box.get(timeout=0.01)


def test_stale_spool_of_a_crashed_run_is_cleared(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "000000000001.msg").write_bytes(b"old")  # unacknowledged: the broker sends it again
    SpillingInbox(max_bytes=10, spool_dir=spool)
    assert not list(spool.glob("*.msg"))
