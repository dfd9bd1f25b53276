"""``fedmq fleet``: real agents, many to a process — each enrolls on its own
connection, trains, encrypts and uploads; every round is exact against the
oracle, and the report has the costs the scale benchmark needs."""

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.long]


@pytest.mark.parametrize("workers", [0, 3])
def test_small_fleet_in_three_processes_every_round_exact(tmp_path, workers):
    out = tmp_path / "fleet.json"
    proc = subprocess.run([sys.executable, "-m", "fedmq", "fleet", "--agents", "12", "--processes", "3",
                           "--rounds", "2", "--broker", "embedded", "--workdir", str(tmp_path / "run"),
                           "--workers", str(workers),
                           "--json", str(out), "--time-limit", "400"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["ok"] and rep["agents"] == 12 and rep["processes"] == 3
    assert [r["round"] for r in rep["rounds"]] == [1, 2]
    for r in rep["rounds"]:
        assert r["status"] == "aggregated" and r["exact"] and r["participants"] == 12 and r["close_s"] > 0
    usage = {u["name"]: u for u in rep["usage"]}
    assert set(usage) == {"broker", "keyauthority", "aggregator", "agent hosts"} | (
        {"shard workers"} if workers else set())
    if workers:  # three workers, four agents each; the root combined their partial sums
        root = (tmp_path / "run/logs/aggregator.log").read_text()
        assert all(f"combined shard-{k}'s partial sum (4 update(s)" in root for k in (1, 2, 3))
    assert usage["agent hosts"]["processes"] == 3 and all(u["peak_rss_mb"] > 10 for u in usage.values())
    # Every agent enrolled on its own: twelve grants, twelve distinct MQTT clients.
    ka_log = (tmp_path / "run/logs/keyauthority.log").read_text()
    assert len({line.split("enrolled ")[1].split()[0] for line in ka_log.splitlines() if "enrolled agent-" in line}) == 12
