"""Local training on this agent's shard of scikit-learn's digits (ships with the
package: nothing is downloaded).

Imported only when the first round arrives, so an idle agent does not carry torch.
The initial model comes from a NumPy generator seeded by the task's ``init_seed``
rather than from torch's initializers, so every agent — whatever its torch
version or device — starts from bit-identical weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedmq.runtime.config import DataSettings, ModelSettings, TrainSettings
from fedmq.learning.models import layer_sizes, mlp

log = logging.getLogger("fedmq.agent.training")

N_FEATURES, N_CLASSES = 64, 10


@dataclass(frozen=True)
class Shard:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_shard(data: DataSettings) -> Shard:
    """The task-wide held-out test set is the same on every agent; the training
    remainder is split into ``num_shards`` disjoint shards."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(data.seed).permutation(len(y))
    n_test = int(round(len(y) * data.test_fraction))
    test, rest = order[:n_test], order[n_test:]
    if data.shard >= data.num_shards:
        raise ValueError(f"data.shard {data.shard} must be below data.num_shards {data.num_shards}")
    mine = np.array_split(rest, data.num_shards)[data.shard]
    return Shard(x[mine], y[mine].astype(np.int64), x[test], y[test].astype(np.int64))


def build_model(model: ModelSettings) -> nn.Module:
    return mlp(N_FEATURES, list(model.hidden), N_CLASSES)


def pick_device(wanted: str) -> torch.device:
    """CUDA when asked for and present; otherwise the CPU, saying why."""
    if wanted == "cuda":
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.warning("profile asks for CUDA but torch sees no GPU; training on the CPU")
    return torch.device("cpu")


class DigitsTrainer:
    def __init__(self, model: ModelSettings, data: DataSettings, train: TrainSettings) -> None:
        torch.set_num_threads(train.torch_threads)
        self.settings = train
        self.model_settings = model
        self.device = pick_device(train.device)
        self.shard = load_shard(data)
        self.model = build_model(model).to(self.device)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        # The shard lives on the device once; batches are index views of it.
        self._x = torch.from_numpy(self.shard.x_train).to(self.device)
        self._y = torch.from_numpy(self.shard.y_train).to(self.device)
        self._amp = train.mixed_precision and self.device.type == "cuda"
        self._seed = data.seed * 1_000_003 + data.shard

    @property
    def num_samples(self) -> int:
        return len(self.shard.y_train)

    def initial_weights(self) -> np.ndarray:
        rng = np.random.default_rng(self.model_settings.init_seed)
        parts = []
        for p in self.model.parameters():
            fan_in = p.shape[1] if p.dim() > 1 else p.shape[0]
            bound = 1.0 / np.sqrt(fan_in)
            parts.append(rng.uniform(-bound, bound, p.numel()))
        return np.concatenate(parts)

    def load(self, weights: np.ndarray) -> None:
        if weights.size != self.n_params:
            raise ValueError(f"weights have {weights.size} values, model has {self.n_params}")
        nn.utils.vector_to_parameters(torch.as_tensor(weights, dtype=torch.float32, device=self.device),
                                      self.model.parameters())

    def weights(self) -> np.ndarray:
        """The update, moved to host memory once, for protection."""
        return nn.utils.parameters_to_vector(self.model.parameters()).detach().cpu().double().numpy()

    def train(self, weights: np.ndarray, rnd: int, progress=None) -> np.ndarray:
        """Local epochs of SGD from the global weights; returns the new weights."""
        self.load(weights)
        s = self.settings
        opt = torch.optim.SGD(self.model.parameters(), lr=s.lr, momentum=0.9)
        gen = torch.Generator().manual_seed(self._seed + rnd)
        loss_fn = nn.CrossEntropyLoss()
        scaler = torch.amp.GradScaler("cuda") if self._amp else None
        self.model.train()
        for _ in range(s.epochs):
            perm = torch.randperm(len(self._y), generator=gen).to(self.device)
            for i in range(0, len(perm), s.batch_size):
                idx = perm[i : i + s.batch_size]
                opt.zero_grad(set_to_none=True)
                if scaler is not None:  # mixed precision on CUDA: fp16 matmuls, fp32 master weights
                    with torch.autocast("cuda", dtype=torch.float16):
                        loss = loss_fn(self.model(self._x[idx]), self._y[idx])
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss_fn(self.model(self._x[idx]), self._y[idx]).backward()
                    opt.step()
            if progress is not None:
                progress.update(1)
        return self.weights()

    def sensitivity(self, weights: np.ndarray, samples: int) -> np.ndarray:
        """Sensitivity map of the given model on the first ``samples`` local samples."""
        from fedmq.privacy.sensitivity import sensitivity_map

        self.load(weights)
        k = min(samples, len(self._y))
        return sensitivity_map(self.model, self._x[:k], self._y[:k])

    def layer_sizes(self) -> list[int]:
        return layer_sizes(self.model)

    @torch.no_grad()
    def evaluate(self, weights: np.ndarray) -> float:
        self.load(weights)
        self.model.eval()
        pred = self.model(torch.from_numpy(self.shard.x_test).to(self.device)).argmax(dim=1).cpu().numpy()
        return float((pred == self.shard.y_test).mean())
