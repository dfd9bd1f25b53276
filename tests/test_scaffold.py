"""`fedmq new` → `pip install -e` the scaffold → two rounds through the demo, the
workload found by its entry point (issue 15)."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_new_install_and_two_rounds(tmp_path):
    fedmq = [sys.executable, "-m", "fedmq"]
    run = subprocess.run([*fedmq, "new", "scaffolded-wl", "--out", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    root = tmp_path / "scaffolded-wl"
    for f in ("pyproject.toml", "README.md", "scaffolded_wl/workload.py", "configs/keyauthority.yaml",
              "configs/aggregator.yaml", "configs/agent-1.yaml", "configs/agent-2.yaml"):
        assert (root / f).exists(), f
    again = subprocess.run([*fedmq, "new", "scaffolded-wl", "--out", str(tmp_path)], capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(root)]
    assert subprocess.run(pip, capture_output=True, text=True).returncode == 0
    try:
        demo = subprocess.run([*fedmq, "demo", "--workload", "scaffolded-wl", "--agents", "2", "--rounds", "2",
                               "--kill-round", "0", "--workdir", str(tmp_path / "run")],
                              capture_output=True, text=True, timeout=300)
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        assert "FedAvg on scaffolded-wl" in demo.stdout and "2 training rounds closed" in demo.stdout
        agent_log = (tmp_path / "run/logs/agent-1.log").read_text()
        assert "workload scaffolded-wl: 178 parameters" in agent_log
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "scaffolded-wl"], capture_output=True)
