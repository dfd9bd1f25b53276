"""The workload API with real processes over the embedded broker (issue 15): a
workload that lives only in the test's temporary directory trains under CKKS and
quantize+he with exact aggregates; one that raises or returns NaN costs one round,
never the agent; a mismatched model is refused by its agent and rejected by the
aggregator; the exported model loads into plain torch and scores what the agent
reported; the built-in csv and image-folder workloads learn generated data."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fedmq.runtime import config as cfgmod
from fedmq.protocol import wire
from tests.conftest import plaintext_fedavg

pytestmark = pytest.mark.slow

WORKLOAD = textwrap.dedent('''
    """A user's workload, not shipped with fedmq: a tiny classifier on synthetic data."""
    import numpy as np
    import torch
    from torch import nn


    def make_data(seed, n=120):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(n, 5)).astype(np.float32)
        y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
        return torch.from_numpy(x), torch.from_numpy(y)


    class Tiny:
        def __init__(self, data_dir, options, device):
            self.options = options
            self.x, self.y = make_data(options.get("seed", 0))
            self.x_test, self.y_test = make_data(999)
            self.num_samples = len(self.y)

        def build_model(self):
            return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))

        def train(self, model, rnd):
            if rnd == self.options.get("raise_in_round"):
                raise RuntimeError("the user's code broke")
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for _ in range(5):
                opt.zero_grad()
                nn.functional.cross_entropy(model(self.x), self.y).backward()
                opt.step()
            if rnd == self.options.get("nan_in_round"):
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))
            return len(self.y), {"loss": 0.5}

        def evaluate(self, model):
            with torch.no_grad():
                return {"accuracy": float((model(self.x_test).argmax(1) == self.y_test).float().mean())}

        def loss(self, outputs, targets):
            return nn.functional.cross_entropy(outputs, targets)

        def sample_batch(self, k):
            return self.x[:k], self.y[:k]
''')


@pytest.fixture
def user_workload(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "tinywl.py").write_text(WORKLOAD)
    monkeypatch.setenv("PYTHONPATH", str(pkg))  # the agents' processes find it; fedmq does not ship it
    return "tinywl:Tiny"


def _overrides(ref, agents, **per_agent):
    return {a: {"workload": cfgmod.WorkloadSettings(name=ref, options={"seed": i, **per_agent.get(a, {})})}
            for i, a in enumerate(agents)}


def test_user_workload_exact_under_ckks_and_one_bad_round_costs_one_round(cluster_factory, user_workload, tmp_path):
    agents = ["agent-1", "agent-2", "agent-3", "agent-4"]
    over = _overrides(user_workload, agents, **{"agent-3": {"raise_in_round": 2}, "agent-4": {"nan_in_round": 2}})
    with cluster_factory(n_agents=4, rounds=3, overrides=over, round_timeout_s=90.0) as (cluster, obs):
        obs.wait_for("closed", 3, timeout=240)
        obs.wait_for("result", 3, timeout=30)
        for rnd, people in ((1, agents), (2, ["agent-1", "agent-2"]), (3, agents)):
            closed = obs.rounds[rnd].closed
            assert closed.status == "aggregated" and closed.participants == people, (rnd, closed)
            from tests.conftest import decrypted_average

            expected, total = plaintext_fedavg(cluster, rnd, people)
            assert obs.results[rnd].total_weight == total
            assert np.abs(decrypted_average(cluster, obs.results[rnd]) - expected).max() < 1e-6
        # Round 2 did not wait for its deadline: the failing agents said they sat it out.
        assert "sits round 2 out: WorkloadFailure: train raised RuntimeError: the user's code broke" in \
            cluster.log_text("aggregator")
        assert "sits round 2 out: WorkloadFailure: train produced" in cluster.log_text("aggregator")
        a3 = cluster.log_text("agent-3")
        assert "Traceback" in a3 and "the user's code broke" in a3  # the traceback in the log, not on the wire
        assert cluster.procs["agent-3"].poll() is None and cluster.procs["agent-4"].poll() is None

        # The trained model, out: plain torch loads it, and it scores what the agent reported.
        out = tmp_path / "export" / "model.safetensors"
        run = subprocess.run([sys.executable, "-m", "fedmq", "model", "export", "--state-dir",
                              str(cluster.workdir / "state/agent-1"), "--out", str(out)],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        meta = json.loads(out.with_suffix(".json").read_text())
        assert meta["round"] == 3
        check = subprocess.run([sys.executable, "-c", textwrap.dedent(f'''
            import sys, torch
            from torch import nn
            from safetensors.torch import load_file
            sys.path.insert(0, {str(tmp_path / "userpkg")!r})
            from tinywl import make_data
            model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
            model.load_state_dict(load_file({str(out)!r}))
            x, y = make_data(999)
            print(float((model(x).argmax(1) == y).float().mean()))
            print("fedmq" in sys.modules)
        ''')], capture_output=True, text=True, timeout=120)
        accuracy, imported = check.stdout.split()
        assert imported == "False"
        assert abs(float(accuracy) - meta["metrics"]["accuracy"]) < 1e-6


def test_mismatched_workload_refused_by_agent_and_rejected_by_aggregator(cluster_factory):
    over = {"agent-3": {"model": cfgmod.ModelSettings(hidden=[16])},  # another layout than the task's
            "agent-4": {"model": cfgmod.ModelSettings(init_seed=7)}}  # same layout, another start
    with cluster_factory(n_agents=4, rounds=2, overrides=over, min_agents=2) as (cluster, obs):
        obs.wait_for("closed", 2, timeout=240)
        for rnd in (1, 2):
            assert obs.rounds[rnd].closed.participants == ["agent-1", "agent-2"]
        agg = cluster.log_text("aggregator")
        # Refused whichever way its upload met the round: before, at or after the quorum's agreement.
        assert "rejected agent-3's round-1 update: layout 1210 params" in agg or \
            "agent-3's update has layout 1210 params" in agg or \
            "rejected updates/digits/1/agent-3/" in agg and "model fingerprint 0c99872037d3" in agg
        assert "task model fixed by a quorum of verified updates" in agg
        a3 = cluster.log_text("agent-3")
        assert "this agent's workload differs from the task's model in its layout (parameter names, shapes or " \
               "dtypes)" in a3
        assert "sits round 2 out" in agg
        assert "this agent's workload differs from the task's model in its initial weights" in \
            cluster.log_text("agent-4")
        assert "not adopted (another workload than the task's)" in a3  # its 1210-parameter model is kept


@pytest.mark.long
def test_user_workload_exact_under_quantize_he(cluster_factory, user_workload):
    plan = cfgmod.QuantizationSettings(layers=[cfgmod.LayerQuantSettings(bits=16, lo=-4, hi=4)], n_ref=100,
                                       max_agents=4)
    agents = ["agent-1", "agent-2"]
    with cluster_factory(n_agents=2, rounds=1, overrides=_overrides(user_workload, agents), quantization=plan,
                         protection=wire.Protection(scheme="quantize+he", p=1.0)) as (cluster, obs):
        obs.wait_for("closed", 1, timeout=180)
        assert obs.rounds[1].closed.participants == agents
        import time

        end = time.monotonic() + 30
        while time.monotonic() < end and not (cluster.workdir / "state/agent-1/model.npz").exists():
            time.sleep(0.2)
        got = np.load(cluster.workdir / "state/agent-1/model.npz")["weights"]
        expected, _ = plaintext_fedavg(cluster, 1, agents)
        assert np.abs(got - expected).max() < 1e-3  # within the 16-bit plan's quantization step


def _csv(path, seed, n=300):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    y = (x[:, 0] - x[:, 2] > 0).astype(int)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ["a,b,c,label"] + [f"{r[0]:.4f},{r[1]:.4f},{r[2]:.4f},{label}" for r, label in zip(x, y)]
    path.write_text("\n".join(rows) + "\n")


def _images(root, seed, per_class=60):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, name in enumerate(["left", "right"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.uniform(0, 60, size=(28, 28))
            img[:, :14] += 150 if label == 0 else 0
            img[:, 14:] += 150 if label == 1 else 0
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / name / f"{i}.png")


@pytest.mark.long
@pytest.mark.parametrize("kind", ["csv", "image-folder"])
def test_builtin_workloads_learn_generated_data(cluster_factory, tmp_path, kind):
    agents = ["agent-1", "agent-2"]
    over = {}
    for i, a in enumerate(agents):
        data = tmp_path / "data" / a
        if kind == "csv":
            _csv(data / "data.csv", i)
            options = {"label": "label", "num_classes": 2, "epochs": 10}
        else:
            _images(data, i)
            options = {"model": "small", "epochs": 3}
        over[a] = {"workload": cfgmod.WorkloadSettings(name=kind, data_dir=data, options=options)}
    with cluster_factory(n_agents=2, rounds=2, overrides=over) as (cluster, obs):
        obs.wait_for("closed", 2, timeout=240)
        import time

        end = time.monotonic() + 30
        while time.monotonic() < end and len(obs.rounds[2].telemetry) < 2:
            obs.poll(timeout=0.2)
        for a in agents:
            tele = obs.rounds[2].telemetry[a]
            assert tele.accuracy is not None and tele.accuracy > 0.8, (a, tele.metrics)  # chance is 0.5
            assert "train_loss" in tele.metrics


def test_dirichlet_shards_are_disjoint_skewed_and_cover_the_rest():
    from fedmq.learning.workloads.classifier_training import split_indices

    labels = np.repeat(np.arange(10), 50)
    parts = [split_indices(500, shard=i, num_shards=4, seed=3, test_fraction=0.2, labels=labels, alpha=0.3)
             for i in range(4)]
    test = parts[0][0]
    assert all(np.array_equal(p[0], test) for p in parts)  # one task-wide test split
    mine = [p[1] for p in parts]
    assert sum(len(m) for m in mine) == 400 and len(np.unique(np.concatenate([*mine, test]))) == 500
    # Non-IID: some shard's label histogram is far from uniform.
    skew = max(np.bincount(labels[m], minlength=10).max() / max(len(m), 1) for m in mine)
    assert skew > 0.2
