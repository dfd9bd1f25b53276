"""Agent lifecycle faults reproduced as a user met them (issue 19), with real
processes and signals: a re-imaged device (wiped state dir) re-enrolls instead of
crash-looping; SIGTERM with the broker down mid-upload exits at once and keeps the
upload on disk for the next start; a state dir of another agent is refused."""

import shutil
import signal
import subprocess
import sys
import time

import pytest

from fedmq.runtime import config as cfgmod
from fedmq.tools.local_cluster import Cluster, free_port

pytestmark = pytest.mark.slow


@pytest.mark.long  # real processes, ~30 s: CI's long pass runs it
def test_wiped_state_dir_reenrolls_and_rejoins(cluster_factory):
    with cluster_factory(n_agents=3, rounds=4) as (cluster, obs):
        obs.wait_for("closed", 1, timeout=120)
        cluster.kill("agent-2", signal.SIGTERM)
        assert cluster.procs["agent-2"].wait(15) == 0
        shutil.rmtree(cluster.workdir / "state/agent-2")  # the device was re-imaged
        cluster.start_role("agent-2")  # same client id: its persistent session still holds round traffic
        obs.wait_for("closed", 4, timeout=240)
        assert cluster.procs["agent-2"].poll() in (None, 0), cluster.log_text("agent-2")[-3000:]
        log = cluster.log_text("agent-2")
        assert "Traceback" not in log and "internal error" not in log
        assert log.count("enrolled; secret HE context received sealed") == 2  # first start and after the wipe
        late = [r for r in (2, 3, 4) if "agent-2" in obs.rounds[r].closed.participants]
        assert late, "the re-imaged agent never took part again"


@pytest.mark.long  # real processes, ~30 s: CI's long pass runs it
def test_sigterm_with_broker_down_mid_upload_exits_and_keeps_the_upload(tmp_path):
    cluster = Cluster(workdir=tmp_path, port=free_port(), n_agents=2, rounds=1, chunk_size=16 * 1024,
                      round_timeout_s=90.0)
    cluster.agent_overrides["agent-2"] = {"faults": cfgmod.FaultSettings(chunk_delay_s=0.4)}
    cluster.write_configs(min_agents=2)
    try:
        cluster.start_all()
        kept = tmp_path / "state/agent-2/uploads"
        end = time.monotonic() + 120
        while time.monotonic() < end and not list(kept.glob("round-1.*")):
            time.sleep(0.2)
        assert list(kept.glob("round-1.*")), "agent-2 never started its upload"
        time.sleep(1.0)  # a few chunks out, most still to go
        cluster.kill("broker", signal.SIGKILL)
        cluster.procs["broker"].wait(10)
        time.sleep(0.5)
        t0 = time.monotonic()
        cluster.kill("agent-2", signal.SIGTERM)
        code = cluster.procs["agent-2"].wait(10)
        took = time.monotonic() - t0
        assert code == 0 and took < 5.0, f"exit {code} after {took:.1f}s"
        assert list(kept.glob("round-1.*")), "the kept upload must stay on disk"

        # Next start: the broker is back, the agent does not train again, and the
        # aggregator completes the upload from what the agent kept.
        cluster.start_broker()
        cluster.start_role("agent-2")
        assert cluster.procs["aggregator"].wait(120) == 0
        agg = cluster.log_text("aggregator")
        assert "round 1 aggregated" in agg and "participants ['agent-1', 'agent-2']" in agg
        a2 = cluster.log_text("agent-2")
        assert "kept upload(s) of round(s) [1] found on disk" in a2
        assert "at the aggregator's request" in a2
        assert a2.count("round 1 update sent") == 0  # interrupted the first time, never trained again
    finally:
        cluster.stop_all()


def test_state_dir_of_another_agent_is_refused(tmp_path):
    state = tmp_path / "state/agent-1"
    state.mkdir(parents=True)
    (state / "agent_id").write_text("agent-1\n")
    conf = tmp_path / "agent-2.yaml"
    conf.write_text(f"agent_id: agent-2\ncredential: abcdefghijklmnopqrstuvwx\nstate_dir: {state}\n"
                    f"authority_key: {'ab' * 32}\nbroker: {{port: {free_port()}}}\n")
    conf.chmod(0o600)
    run = subprocess.run([sys.executable, "-m", "fedmq", "agent", "--config", str(conf)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2
    assert f"state_dir {state} belongs to agent 'agent-1', not 'agent-2'" in run.stdout + run.stderr
