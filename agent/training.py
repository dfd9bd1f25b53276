"""Local training on this agent's shard of scikit-learn's digits (ships with the
package: nothing is downloaded).

Imported only when the first round arrives, so an idle agent does not carry torch.
The initial model comes from a NumPy generator seeded by the task's ``init_seed``
rather than from torch's initializers, so every agent — whatever its torch
version or device — starts from bit-identical weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedmq.config import DataSettings, ModelSettings, TrainSettings
from fedmq.models import layer_sizes, mlp

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


class DigitsTrainer:
    def __init__(self, model: ModelSettings, data: DataSettings, train: TrainSettings) -> None:
        torch.set_num_threads(train.torch_threads)
        self.settings = train
        self.model_settings = model
        self.shard = load_shard(data)
        self.model = build_model(model)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self._x = torch.from_numpy(self.shard.x_train)
        self._y = torch.from_numpy(self.shard.y_train)
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
        nn.utils.vector_to_parameters(torch.as_tensor(weights, dtype=torch.float32), self.model.parameters())

    def weights(self) -> np.ndarray:
        return nn.utils.parameters_to_vector(self.model.parameters()).detach().double().numpy()

    def train(self, weights: np.ndarray, rnd: int, progress=None) -> np.ndarray:
        """Local epochs of SGD from the global weights; returns the new weights."""
        self.load(weights)
        s = self.settings
        opt = torch.optim.SGD(self.model.parameters(), lr=s.lr, momentum=0.9)
        gen = torch.Generator().manual_seed(self._seed + rnd)
        loss_fn = nn.CrossEntropyLoss()
        self.model.train()
        for _ in range(s.epochs):
            perm = torch.randperm(len(self._y), generator=gen)
            for i in range(0, len(perm), s.batch_size):
                idx = perm[i : i + s.batch_size]
                opt.zero_grad()
                loss_fn(self.model(self._x[idx]), self._y[idx]).backward()
                opt.step()
            if progress is not None:
                progress.update(1)
        return self.weights()

    def sensitivity(self, weights: np.ndarray, samples: int) -> np.ndarray:
        """Sensitivity map of the given model on the first ``samples`` local samples."""
        from fedmq.sensitivity import sensitivity_map

        self.load(weights)
        k = min(samples, len(self._y))
        return sensitivity_map(self.model, self._x[:k], self._y[:k])

    def layer_sizes(self) -> list[int]:
        return layer_sizes(self.model)

    @torch.no_grad()
    def evaluate(self, weights: np.ndarray) -> float:
        self.load(weights)
        self.model.eval()
        pred = self.model(torch.from_numpy(self.shard.x_test)).argmax(dim=1).numpy()
        return float((pred == self.shard.y_test).mean())
