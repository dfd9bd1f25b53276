"""The agent's side of the workload API without a broker: an initial weights file
is checked against its SHA-256 and used; checkpoints keep the last K rounds and
export them; a bad reference is refused at start without importing torch."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from fedmq.learning import workload as workload_api
from fedmq.runtime import config as cfgmod


def _cfg(tmp_path, **workload):
    return cfgmod.AgentConfig(agent_id="agent-1", credential="x" * 20, state_dir=tmp_path / "state",
                              workload=cfgmod.WorkloadSettings(name="digits-mlp", options={"hidden": [8]}, **workload),
                              checkpoints=2)


def test_initial_weights_file_is_hashed_and_used(tmp_path):
    from safetensors.numpy import save_file

    from agent.workload_trainer import WorkloadTrainer, WorkloadUnusable

    seeded = WorkloadTrainer(_cfg(tmp_path))
    start = {name: np.full(shape, 0.25, dtype="float32") for name, shape, _ in seeded.layout}
    path = tmp_path / "init.safetensors"
    save_file(start, str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    from_file = WorkloadTrainer(_cfg(tmp_path, initial_weights=path, initial_sha256=digest))
    assert np.all(from_file.initial_weights() == 0.25)
    assert from_file.fingerprint[:16] == seeded.fingerprint[:16]  # same layout
    assert from_file.fingerprint[16:] != seeded.fingerprint[16:]  # another start
    with pytest.raises(WorkloadUnusable, match="SHA-256"):
        WorkloadTrainer(_cfg(tmp_path, initial_weights=path, initial_sha256="0" * 64))
    with pytest.raises(ValueError, match="initial_sha256"):
        cfgmod.WorkloadSettings(initial_weights=path)


def test_checkpoints_keep_the_last_k_and_export(tmp_path):
    from agent import model_files
    from agent.workload_trainer import WorkloadTrainer

    cfg = _cfg(tmp_path)
    trainer = WorkloadTrainer(cfg)
    state = tmp_path / "state"
    state.mkdir()
    for rnd in (1, 2, 3):
        weights = trainer.train(trainer.initial_weights(), rnd)
        model_files.save(state, rnd, weights, trainer, trainer.evaluate(weights), keep_checkpoints=2)
    kept = sorted(p.name for p in (state / "checkpoints").glob("*.safetensors"))
    assert kept == ["round-2.safetensors", "round-3.safetensors"]
    meta = model_files.export(state, tmp_path / "r2.safetensors", 2)
    assert meta["round"] == 2 and "accuracy" in meta["metrics"]
    with pytest.raises(FileNotFoundError, match="no checkpoint of round 1"):
        model_files.export(state, tmp_path / "r1.safetensors", 1)
    latest = model_files.export(state, tmp_path / "latest.safetensors")
    assert json.loads((tmp_path / "latest.json").read_text())["round"] == latest["round"] == 3


def test_unknown_workload_refused_at_start_without_torch(tmp_path):
    with pytest.raises(workload_api.WorkloadError, match="cannot find module 'no_such_module'"):
        workload_api.check_reference("no_such_module:Thing")
    with pytest.raises(workload_api.WorkloadError, match="not a built-in"):
        workload_api.check_reference("no-such-entry-point")
    conf = tmp_path / "agent.yaml"
    conf.write_text(f"agent_id: agent-1\ncredential: abcdefghijklmnopqrstuvwx\nstate_dir: {tmp_path / 'state'}\n"
                    f"authority_key: {'ab' * 32}\nworkload: {{name: 'no_such_module:Thing'}}\n")
    conf.chmod(0o600)
    run = subprocess.run([sys.executable, "-m", "fedmq", "agent", "--config", str(conf)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and "cannot find module 'no_such_module'" in run.stderr + run.stdout
    code = "import fedmq.learning.workload as w, sys; w.check_reference('digits-mlp'); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
