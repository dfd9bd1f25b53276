"""The agent's side of the workload API: everything but the user's five methods.

The workload builds the model, loads the data, trains and evaluates; this module
flattens the parameters in ``named_parameters()`` order, gives every agent the
identical initial model (drawn from a seed by the agent itself, or a safetensors
file whose SHA-256 the task names), fingerprints the task's model, computes the
sensitivity map with the workload's own loss, and refuses what a misbehaving
workload hands back (non-finite weights or metrics, changed shapes).

Imported when the first round arrives: torch comes with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from agent.enrollment import StartRefused
from fedmq.learning import workload as workload_api
from fedmq.learning.models import layer_sizes
from fedmq.runtime.config import AgentConfig

log = logging.getLogger("fedmq.agent.training")


class WorkloadFailure(RuntimeError):
    """The workload misbehaved this round; the agent sits the round out."""


class WorkloadUnusable(StartRefused):
    """The workload cannot be loaded at all: the agent stops (exit 2)."""


def pick_device(wanted: str) -> torch.device:
    """CUDA when asked for and present; otherwise the CPU, saying why."""
    if wanted == "cuda":
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.warning("profile asks for CUDA but torch sees no GPU; training on the CPU")
    return torch.device("cpu")


def layout_of(model: nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    return [(name, tuple(p.shape), str(p.dtype).replace("torch.", "")) for name, p in model.named_parameters()]


def seeded_initial(layout: list[tuple[str, tuple[int, ...], str]], seed: int) -> np.ndarray:
    """U(-1/sqrt(fan_in), +1/sqrt(fan_in)) per tensor from a NumPy generator: bit-identical
    on every agent, whatever its torch build or device."""
    rng = np.random.default_rng(seed)
    parts = []
    for _, shape, _ in layout:
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
        bound = 1.0 / np.sqrt(fan_in)
        parts.append(rng.uniform(-bound, bound, math.prod(shape)))
    return np.concatenate(parts)


def file_initial(path: Path, sha256: str, layout: list[tuple[str, tuple[int, ...], str]]) -> np.ndarray:
    from safetensors.numpy import load_file

    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if digest != sha256:
        raise WorkloadUnusable(f"initial_weights {path} has SHA-256 {digest}, the task names {sha256}")
    tensors = load_file(str(path))
    parts = []
    for name, shape, _ in layout:
        if name not in tensors or tuple(tensors[name].shape) != shape:
            got = tuple(tensors[name].shape) if name in tensors else "nothing"
            raise WorkloadUnusable(f"initial_weights {path}: {name} should be {shape}, the file has {got}")
        parts.append(tensors[name].astype(np.float64).ravel())
    return np.concatenate(parts)


class WorkloadTrainer:
    def __init__(self, cfg: AgentConfig) -> None:
        self.settings = cfg.effective_workload()
        torch.set_num_threads(cfg.train.torch_threads)
        self.device = pick_device(cfg.train.device)
        try:
            self.workload = workload_api.load(self.settings.name, self.settings.data_dir,
                                              dict(self.settings.options), self.device.type)
            self.model = self.workload.build_model().to(self.device)
        except workload_api.WorkloadError as exc:
            raise WorkloadUnusable(str(exc)) from exc
        except Exception as exc:
            raise WorkloadUnusable(f"workload {self.settings.name!r}: build_model failed: "
                                   f"{type(exc).__name__}: {exc}") from exc
        self.layout = layout_of(self.model)
        self.n_params = sum(math.prod(shape) for _, shape, _ in self.layout)
        s = self.settings
        self._initial = file_initial(s.initial_weights, s.initial_sha256, self.layout) if s.initial_weights \
            else seeded_initial(self.layout, s.init_seed)
        layout_digest = hashlib.sha256(json.dumps(self.layout).encode()).digest()[:16]
        self.fingerprint = layout_digest + hashlib.sha256(self._initial.astype("<f8").tobytes()).digest()[:16]
        self.train_metrics: dict[str, float] = {}
        log.info("workload %s: %d parameters in %d tensors, fingerprint %s", s.name, self.n_params,
                 len(self.layout), self.fingerprint.hex()[:16])

    @property
    def num_samples(self) -> int:
        return int(self.workload.num_samples)

    def initial_weights(self) -> np.ndarray:
        return self._initial.copy()

    def load(self, weights: np.ndarray) -> None:
        if weights.size != self.n_params:
            raise ValueError(f"weights have {weights.size} values, model has {self.n_params}")
        nn.utils.vector_to_parameters(torch.as_tensor(weights, dtype=torch.float32, device=self.device),
                                      self.model.parameters())

    def weights(self) -> np.ndarray:
        return nn.utils.parameters_to_vector(self.model.parameters()).detach().cpu().double().numpy()

    def train(self, weights: np.ndarray, rnd: int) -> np.ndarray:
        """One round of the workload's training from the global weights; WorkloadFailure
        if it hands back something that must not be uploaded."""
        self.load(weights)
        try:
            result = self.workload.train(self.model, rnd)
        except Exception as exc:
            raise WorkloadFailure(f"train raised {type(exc).__name__}: {exc}") from exc
        num_samples, metrics = result if isinstance(result, tuple) else (result, {})
        if not isinstance(num_samples, int) or num_samples < 1:
            raise WorkloadFailure(f"train returned {num_samples!r} samples; expected a positive int")
        self.workload.num_samples = num_samples
        self.train_metrics = _finite_metrics(metrics, "train")
        if layout_of(self.model) != self.layout:
            raise WorkloadFailure("train changed the model's parameter names or shapes")
        new = self.weights()
        if not np.isfinite(new).all():
            raise WorkloadFailure(f"train produced {int((~np.isfinite(new)).sum())} non-finite weights")
        return new

    def evaluate(self, weights: np.ndarray) -> dict[str, float]:
        self.load(weights)
        with torch.no_grad():
            return _finite_metrics(self.workload.evaluate(self.model), "evaluate")

    def sensitivity(self, weights: np.ndarray, samples: int) -> np.ndarray:
        """The sensitivity map with the workload's own loss, on ``samples`` local samples."""
        from fedmq.privacy.sensitivity import sensitivity_map

        self.load(weights)
        x, y = self.workload.sample_batch(samples)
        return sensitivity_map(self.model, x, y, loss_fn=self.workload.loss)

    def layer_sizes(self) -> list[int]:
        return layer_sizes(self.model)


def _finite_metrics(metrics, where: str) -> dict[str, float]:
    if not isinstance(metrics, dict):
        raise WorkloadFailure(f"{where} returned {type(metrics).__name__}; expected a dict of metrics")
    out = {}
    for k, v in list(metrics.items())[:32]:
        try:
            value = float(v)
        except (TypeError, ValueError):
            raise WorkloadFailure(f"{where} metric {k!r} is {v!r}, not a number") from None
        if not math.isfinite(value):
            raise WorkloadFailure(f"{where} metric {k!r} is {value}")
        out[str(k)[:32]] = value
    return out
