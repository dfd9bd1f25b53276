"""The agent as a systemd service: the unit passes systemd's own verifier, and the
notify protocol (READY, STATUS, WATCHDOG, RELOADING, STOPPING) goes through a real
NOTIFY_SOCKET while the agent runs against a real broker; SIGHUP reloads the
config, SIGTERM says offline, and a restart resumes from the state directory."""

import shutil
import signal
import socket
import subprocess
import time

import pytest

from fedmq.runtime import config as cfgmod
from fedmq.runtime.device_profiles import detect, profiles
from fedmq.runtime.sd_notify import Notifier
from fedmq.runtime.systemd_unit import render_unit


def _verify(path) -> subprocess.CompletedProcess:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze missing: .ci/run installs Debian's systemd package")
    return subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("profile, state", [("laptop", "/var/lib/fedmq/agent-1"), ("gpu-server", "/srv/fedmq")])
def test_unit_passes_systemd_analyze_verify(tmp_path, profile, state):
    conf = tmp_path / "agent.yaml"
    conf.touch(mode=0o600)
    conf.write_text(f"agent_id: agent-1\ncredential: abcdefghijklmnopqrstuvwx\nstate_dir: {state}\n"
                    f"profile: {profile}\nmemory_limit_mb: 1024\n")
    cfg = cfgmod.load(cfgmod.AgentConfig, conf)
    unit = tmp_path / "fedmq-agent.service"
    unit.write_text(render_unit(cfg, conf))
    text = unit.read_text()
    for line in ("Type=notify", "WatchdogSec=120", "Restart=on-failure", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "User=fedmq"):
        assert line in text
    assert ("StateDirectory=fedmq" in text) == state.startswith("/var/lib")
    assert ("PrivateDevices=yes" in text) == (profile != "gpu-server")  # a GPU needs /dev/nvidia*
    res = _verify(unit)
    assert res.returncode == 0 and unit.name not in res.stderr + res.stdout, res.stderr  # not even a warning
    broken = tmp_path / "broken.service"
    broken.write_text(text.replace("ExecStart=/", "ExecStart="))
    assert _verify(broken).returncode != 0  # the verifier is really judging
    typo = tmp_path / "typo.service"
    typo.write_text(text.replace("Type=notify", "Type=notifyy"))
    assert "Failed to parse service type" in _verify(typo).stderr


def test_relative_state_dir_is_refused(tmp_path):
    cfg = cfgmod.AgentConfig(agent_id="a", credential="x" * 20, state_dir="state/a")
    with pytest.raises(ValueError, match="absolute"):
        render_unit(cfg, tmp_path / "agent.yaml")


def test_profiles_fill_only_what_the_file_leaves_unset():
    cfg = cfgmod.AgentConfig(agent_id="a", credential="x" * 20, profile="raspberry-pi", chunk_size=4096,
                             train={"batch_size": 8})
    got = cfgmod.apply_profile(cfg)
    pi = profiles()["raspberry-pi"]
    assert got.train.batch_size == 8 and got.chunk_size == 4096  # explicit values win
    assert got.train.torch_threads == pi.torch_threads and got.memory_limit_mb == pi.memory_limit_mb
    assert cfgmod.apply_profile(cfg.model_copy(update={"profile": "gpu-server"})).train.device == "cuda"
    assert detect() in profiles()


def _recv_all(sock: socket.socket, until: str, timeout: float) -> list[str]:
    got, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        sock.settimeout(max(end - time.monotonic(), 0.01))
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if until in got[-1]:
            break
    return got


@pytest.mark.slow
def test_notify_protocol_reload_and_stop_through_a_real_socket(tmp_path, cluster_factory):
    addr = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(addr)
    with cluster_factory(n_agents=2, rounds=1) as (cluster, obs):
        end = time.monotonic() + 90
        while "online and waiting" not in cluster.log_text("agent-2") and time.monotonic() < end:
            time.sleep(0.2)
        cluster.kill("agent-2", signal.SIGKILL)  # enrolled once; the service restart must not enroll again
        cluster.procs["agent-2"].wait(10)
        agent = cluster.start_role("agent-2", env={"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "2000000"})
        msgs = _recv_all(sock, "READY=1", 90)
        assert any("READY=1" in m for m in msgs), msgs
        assert any(m.startswith("STATUS=") or "\nSTATUS=" in m for m in msgs)
        pings = _recv_all(sock, "never", 3.5)
        assert sum("WATCHDOG=1" in m for m in pings) >= 2, pings  # every second for a 2 s watchdog

        conf = cluster.config_path("agent-2")
        conf.write_text(conf.read_text().replace("epochs: 5", "epochs: 2"))
        agent.send_signal(signal.SIGHUP)
        msgs = _recv_all(sock, "READY=1", 20)
        assert any("RELOADING=1" in m for m in msgs) and "READY=1" in msgs[-1], msgs
        agent.send_signal(signal.SIGTERM)
        msgs = _recv_all(sock, "STOPPING=1", 20)
        assert any("STOPPING=1" in m for m in msgs), msgs
        assert agent.wait(20) == 0
        log = cluster.log_text("agent-2")
        assert "configuration reloaded" in log
        assert "keys loaded from" in log  # the restart resumed from its state directory, no re-enrollment
        end = time.monotonic() + 10
        while time.monotonic() < end and "agent-2 is offline" not in cluster.log_text("aggregator"):
            obs.poll(0.2)
        assert "agent-2 is offline" in cluster.log_text("aggregator")
    sock.close()


def test_notifier_is_silent_without_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier().ready("x")


def test_install_unit_warns_about_tmp_under_private_tmp(tmp_path):
    """Issue 19: a unit whose config lies in /tmp cannot start under PrivateTmp=yes: say so."""
    import subprocess
    import sys

    conf = tmp_path / "agent.yaml"  # pytest's tmp_path lies under /tmp
    conf.write_text("agent_id: agent-1\ncredential: abcdefghijklmnopqrstuvwx\nstate_dir: /var/lib/fedmq/agent-1\n")
    conf.chmod(0o600)
    run = subprocess.run([sys.executable, "-m", "fedmq", "install-unit", "--config", str(conf), "--out",
                          str(tmp_path / "fedmq-agent.service")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and (tmp_path / "fedmq-agent.service").exists()
    assert str(tmp_path).startswith("/tmp/") and "PrivateTmp=yes" in run.stderr
