"""Telemetry of real rounds lands in the aggregator's database with plausible
values — non-zero times, and each agent's bytes-sent equal to the bytes the
aggregator itself accepted from it — Prometheus serves the same story, and
``fedmq report`` prints it and draws the PNGs."""

import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fedmq.tools.local_cluster import free_port
from fedmq.runtime.telemetry_db import read_rounds

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_telemetry_database_metrics_and_report(cluster_factory, tmp_path):
    metrics_port = free_port()
    with cluster_factory(n_agents=2, rounds=2, aggregator_overrides={"metrics_port": metrics_port}) as (cluster, obs):
        obs.wait_for("closed", 1, timeout=180)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert 'fedmq_rounds_total{status="aggregated"} 1.0' in metrics
        assert "fedmq_agents_online 2.0" in metrics and "fedmq_update_bytes_total" in metrics
        obs.wait_for("closed", 2, timeout=180)
        end = time.monotonic() + 30
        while 'fedmq_workload_metric{agent="agent-1",metric="accuracy"}' not in metrics and time.monotonic() < end:
            obs.poll(timeout=0.5)
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert 'fedmq_workload_metric{agent="agent-1",metric="accuracy"}' in metrics
        assert cluster.procs["aggregator"].wait(60) == 0  # it lingers for the last telemetry, then exits
    db = tmp_path / "state/aggregator/telemetry.sqlite"
    rows = read_rounds(db)
    closed = {r: set(obs.rounds[r].closed.participants) for r in (1, 2)}
    got = {(r["round"], r["agent"]) for r in rows}
    assert {(r, a) for r, people in closed.items() for a in people} <= got
    for r in rows:
        if r["agent"] in closed.get(r["round"], ()):
            assert r["bytes_sent"] > 0 and r["bytes_sent"] == r["uploaded_bytes"], r  # agent's count == ours
            assert r["bytes_received"] > 0 and r["peak_rss"] > 20e6 and 0 < r["accuracy"] <= 1
    con = sqlite3.connect(db)
    phases = {p for (p,) in con.execute("SELECT DISTINCT phase FROM phases")}
    assert {"train", "encrypt", "serialize", "upload", "download", "decrypt", "evaluate"} <= phases
    for phase, wall, cpu, peak, sent in con.execute("SELECT phase, wall_s, cpu_s, peak_rss, bytes_sent FROM phases"):
        assert wall > 0 and peak > 0, phase
        if phase == "train":
            assert cpu > 0
        if phase == "upload":
            assert sent > 0

    # The workload's metrics (issue 15): evaluate's and train's, per agent and round.
    metrics = {(a, n) for a, n in con.execute("SELECT agent, name FROM metrics")}
    assert {("agent-1", "accuracy"), ("agent-1", "train_loss"), ("agent-2", "loss")} <= metrics

    out = tmp_path / "png"
    res = subprocess.run([sys.executable, "-m", "fedmq", "report", "--db", str(db), "--png", str(out)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "agent-1" in res.stdout and "agent-2" in res.stdout
    for name in ("time_breakdown.png", "bytes_per_round.png", "accuracy_per_round.png", "workload_metrics.png"):
        assert (out / name).stat().st_size > 5000
