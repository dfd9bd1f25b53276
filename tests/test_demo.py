"""The main job, as a user runs it: default demo, one agent killed mid-round."""

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_defaults_reach_target_accuracy(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fedmq", "demo", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    last = out.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"demo: (\d+) training rounds closed(?: \(\+ the mask agreement round\))?, final accuracy (\d\.\d\d)", last)
    assert m, last
    assert int(m.group(1)) == 5
    assert float(m.group(2)) >= 0.85
    assert "SIGKILL agent-4" in out.stdout
    assert re.search(r"round 3 aggregated: .*\(3 reported\)", out.stdout), out.stdout
