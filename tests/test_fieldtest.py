"""The field-test harness: smoke.yaml end to end (real mosquitto, real processes, every
kind of fault), and the parts it trusts — the proxy and the exactness oracle."""

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedmq.privacy import he, protection
from fedmq.tools.local_broker import rabbitmq_binary
from fedmq.protocol import wire
from fedmq.runtime.config import ConfigError
from fedmq.tools.fieldtest import oracle
from fedmq.tools.fieldtest.scenario import load_scenario
from fedmq.tools.fieldtest.tcp_proxy import TcpProxy

ROOT = Path(__file__).resolve().parent.parent


def _fieldtest(scenario: Path, tmp_path: Path, timeout: float = 900) -> tuple[subprocess.CompletedProcess, dict]:
    """`fedmq fieldtest SCENARIO` as a user runs it; its report, after asserting it passed."""
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "fedmq", "fieldtest", str(scenario), "--workdir",
                           str(tmp_path / "run"), "--json", str(out)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.long
def test_smoke_scenario_passes_with_every_fault_applied(tmp_path):
    from tests.conftest import mosquitto_binary

    mosquitto_binary()  # the smoke test is meant to run on the real broker
    proc, report = _fieldtest(ROOT / "configs/fieldtests/smoke.yaml", tmp_path, timeout=240)
    assert report["ok"] and report["broker"] == "mosquitto"
    assert [r["status"] for r in report["rounds"]] == ["aggregated"] * 4
    assert all(r["max_error"] < 1e-6 for r in report["rounds"])
    applied = " ".join(f for r in report["rounds"] for f in r["faults"])
    for what in ("SIGKILL agent-5 (mid-upload)", "network drop", "SIGSTOP agent-3", "network blackhole",
                 "kill -9 aggregator", "network delay", "broker (mosquitto) restart", "SIGKILL agent-2"):
        assert what in applied, (what, applied)
    assert report["aggregator_resumes"] == 1 and not report["faults_skipped"]
    assert "PASS" in proc.stdout


@pytest.mark.slow
@pytest.mark.long
def test_sharded_aggregation_under_thirty_percent_faults_every_round_exact(tmp_path):
    """Issue 17: two shard workers, each killed -9 mid-round once (and the root once, and
    the broker restarted), 30% agent faults per round: every round exact."""
    _, report = _fieldtest(ROOT / "configs/fieldtests/sharded.yaml", tmp_path)
    assert report["ok"] and [r["status"] for r in report["rounds"]] == ["aggregated"] * 8
    applied = " ".join(f for r in report["rounds"] for f in r["faults"])
    assert "kill -9 shard-1 (mid-round" in applied and "kill -9 shard-2 (mid-round" in applied
    assert "kill -9 aggregator (mid-round" in applied
    for worker in ("shard-1", "shard-2"):
        assert "after a restart:" in (tmp_path / f"run/logs/{worker}.log").read_text()


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.skipif(rabbitmq_binary() is None, reason="RabbitMQ is not installed here (.ci/run installs it)")
def test_clustered_broker_losing_a_node_under_faults_every_round_exact(tmp_path):
    """A RabbitMQ cluster of three nodes; node 1 is SIGKILLed mid-round 2 for good, with
    agent faults around it: the agents on it fail over and every round is exact."""
    scenario = tmp_path / "cluster.yaml"
    scenario.write_text("name: cluster\nagents: 6\nrounds: 3\nbroker: rabbitmq-cluster\nmin_agents: 3\n"
                        "round_timeout_s: 90\nselection_grace_s: 30\nchunk_delay_s: 0.1\n"
                        "faults:\n  - {round: 2, kind: broker-node-kill, node: 1, after_s: 2.0}\n"
                        "  - {round: 3, kind: kill, agent: agent-3, phase: upload}\n")
    _, report = _fieldtest(scenario, tmp_path)
    assert report["ok"] and report["broker"] == "rabbitmq-cluster"
    assert "RabbitMQ node 1 of 3 SIGKILLed" in " ".join(report["rounds"][1]["faults"])
    for agent in ("agent-2", "agent-5"):  # node 1's agents
        assert "reconnecting via broker node" in (tmp_path / f"run/logs/{agent}.log").read_text()


@pytest.mark.slow
@pytest.mark.long
def test_thirty_percent_faults_with_secure_masking_every_round_exact(tmp_path):
    """Issue 16: 30% faults per round with masking on — dropouts before and after
    upload, the aggregator killed mid-upload and again after asking for the mask
    correction, a broker restart — and every round's unmasked sum exact."""
    _, report = _fieldtest(ROOT / "configs/fieldtests/thirty-percent-masked.yaml", tmp_path)
    assert report["ok"] and [r["status"] for r in report["rounds"]] == ["aggregated"] * 8
    assert all(r["max_error"] < 1e-5 for r in report["rounds"])
    applied = " ".join(f for r in report["rounds"] for f in r["faults"])
    assert "kill -9 aggregator (mid-unmasking" in applied and "kill -9 aggregator (mid-round" in applied
    assert report["aggregator_resumes"] == 2
    log = (tmp_path / "run/logs/keyauthority.log").read_text()
    assert log.count("unmasked round") >= 8
    # The aggregator killed after asking in round 5 asked again for the same survivors, and got them.
    assert log.count("unmasked round 5 for") >= 2 and "refused to unmask" not in log


def _echo_server() -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=conn: [c.sendall(d) for d in iter(lambda: c.recv(4096), b"")],
                             daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def _cut(conn: socket.socket) -> bool:
    try:
        return conn.recv(100) == b""
    except ConnectionResetError:
        return True


def test_proxy_modes_pass_delay_blackhole_drop():
    srv, port = _echo_server()
    proxy = TcpProxy(port).start()
    try:
        c = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
        c.sendall(b"hello")
        assert c.recv(100) == b"hello"

        proxy.set_mode("delay", 0.3)
        time.sleep(0.05)
        t0 = time.monotonic()
        c.sendall(b"slow")
        assert c.recv(100) == b"slow" and time.monotonic() - t0 >= 0.5  # both directions delayed

        proxy.set_mode("blackhole")
        time.sleep(0.05)
        c.sendall(b"lost?")
        c.settimeout(0.5)
        with pytest.raises(socket.timeout):
            c.recv(100)
        proxy.set_mode("pass")  # the partition heals: what was held arrives
        c.settimeout(2)
        assert c.recv(100) == b"lost?"

        proxy.set_mode("drop")
        time.sleep(0.05)
        assert _cut(c), "the connection should be reset"
        c2 = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
        c2.sendall(b"anyone?")
        assert _cut(c2), "new connections are reset while the link is down"
        assert proxy.connections == 2
    finally:
        proxy.stop()
        srv.close()


def test_oracle_flags_a_wrong_or_double_counted_aggregate(tmp_path):
    secret = he.create_secret_context(he.CkksParams())
    rng = np.random.default_rng(0)
    updates = {a: (rng.normal(size=300), n) for a, n in (("agent-1", 10), ("agent-2", 30))}
    for a, (w, n) in updates.items():
        np.savez(tmp_path / f"{a}-round1.npz", weights=w, num_samples=n, mask=np.ones(300, dtype=bool))
    people = sorted(updates)

    def result(contributions):
        acc = None
        for a, factor in contributions:
            w, n = updates[a]
            acc = he.add_into(acc, he.load_ciphertexts(
                secret, protection.encrypt_weighted(secret, w * factor, n, 2), 300))
        total = sum(updates[a][1] for a, _ in contributions)
        return wire.Result(participants=people, total_weight=total, n_params=300, n_encrypted=300,
                           ciphertexts=he.serialize_all(acc), plain_avg=b"")

    closed = wire.RoundClosed(status="aggregated", reason="test", participants=people, dropped=[], total_weight=40,
                              bytes_received=0, agg_s=0.0)
    good = oracle.check_round(secret, tmp_path, 1, result([("agent-1", 1), ("agent-2", 1)]), closed, 1e-6)
    assert good.ok and good.max_error < 1e-6
    twice = oracle.check_round(secret, tmp_path, 1, result([("agent-1", 1), ("agent-2", 1), ("agent-2", 1)]),
                               closed, 1e-6)
    assert not twice.ok and "counted twice" in twice.detail
    off = oracle.check_round(secret, tmp_path, 1, result([("agent-1", 1), ("agent-2", 1.001)]), closed, 1e-6)
    assert not off.ok and "off by" in off.detail


def test_scenario_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nagents: 3\nrounds: 2\nfaults:\n  - {round: 1, kind: kill}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: .*needs 'agent'"):
        load_scenario(bad)
    bad.write_text("name: x\nagents: 3\nrounds: 2\nfaults:\n  - {round: 5, kind: broker-restart}\n")
    with pytest.raises(ConfigError, match="fault in round 5"):
        load_scenario(bad)
    assert load_scenario(ROOT / "configs/fieldtests/smoke.yaml").agents == 5
    bad.write_text("name: x\nagents: 3\nrounds: 2\nfaults:\n  - {round: 1, kind: worker-kill, agent: shard-1}\n")
    with pytest.raises(ConfigError, match="the shard workers are"):
        load_scenario(bad)
    bad.write_text("name: x\nagents: 3\nrounds: 2\nrandom_faults: {worker_kill_rounds: [1]}\n")
    with pytest.raises(ConfigError, match="worker_kill_rounds needs shard_workers"):
        load_scenario(bad)
    sharded = load_scenario(ROOT / "configs/fieldtests/sharded.yaml")
    drawn = sharded.draw(5, sharded.agent_ids, np.random.default_rng(0))
    assert [f.agent for f in drawn if f.kind == "worker-kill"] == ["shard-2"]  # the kills take the workers in turn


@pytest.mark.slow
@pytest.mark.long  # real processes, ~30 s: CI's long pass runs it
def test_sigterm_stops_every_process_and_reports_the_closed_rounds(tmp_path):
    """Issue 19: a field test stopped by SIGTERM (or Ctrl-C) stops what it started —
    no orphaned agent, aggregator or broker — and reports the rounds that closed."""
    import signal
    import time

    import psutil

    out, work = tmp_path / "report.json", tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fedmq", "fieldtest", str(ROOT / "configs/fieldtests/smoke.yaml"),
                             "--workdir", str(work), "--json", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines = []
    for line in proc.stdout:  # wait for the first round to close
        lines.append(line)
        if line.startswith("round 1 "):
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    text = "".join(lines) + rest
    assert proc.returncode == 130, text[-3000:]
    assert "interrupted" in text
    report = json.loads(out.read_text())
    assert report["interrupted"] and not report["ok"] and report["rounds"][0]["round"] == 1
    time.sleep(1)
    left = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
            if any(str(work) in part for part in (p.info["cmdline"] or []))]
    assert not left, left
