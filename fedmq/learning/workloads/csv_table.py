"""``csv``: a tabular classifier or regressor for sensor-style data — one CSV file
per device (header row, numeric columns), the label column named in options."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from fedmq.learning.models import mlp
from fedmq.learning.workload import Workload
from fedmq.learning.workloads.classifier_training import classification_metrics, sgd_epochs, split_indices


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str = "data.csv"  # inside the agent's data_dir
    label: str  # the label column
    kind: Literal["classification", "regression"] = "classification"
    num_classes: int = Field(2, ge=2)  # the same on every agent, whatever its local labels
    hidden: list[int] = [32]
    test_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0)


def read_table(path: Path, label: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or label not in rows[0]:
        raise ValueError(f"{path}: no column {label!r} in the header {rows[0] if rows else []}")
    header = rows[0]
    data = np.array([[float(v) for v in r] for r in rows[1:] if r], dtype=np.float32)
    col = header.index(label)
    features = [h for i, h in enumerate(header) if i != col]
    return np.delete(data, col, axis=1), data[:, col], features


class CsvTable(Workload):
    Options = Options

    def __init__(self, data_dir, options: Options, device: str) -> None:
        super().__init__(data_dir, options, device)
        if data_dir is None:
            raise ValueError("the csv workload needs workload.data_dir")
        x, y, self.features = read_table(Path(data_dir) / options.file, options.label)
        test, mine = split_indices(len(y), shard=0, num_shards=1, seed=options.seed,
                                   test_fraction=options.test_fraction)
        self.classify = options.kind == "classification"
        y_t = torch.from_numpy(y).long() if self.classify else torch.from_numpy(y).float().unsqueeze(1)
        self.x, self.y = torch.from_numpy(x[mine]).to(device), y_t[mine].to(device)
        self.num_samples = len(mine)
        self.x_test, self.y_test = torch.from_numpy(x[test]).to(device), y_t[test].to(device)

    def build_model(self) -> torch.nn.Module:
        out = self.options.num_classes if self.classify else 1
        return mlp(len(self.features), list(self.options.hidden), out)

    def loss(self, outputs, targets):
        f = torch.nn.functional
        return f.cross_entropy(outputs, targets) if self.classify else f.mse_loss(outputs, targets)

    def train(self, model, rnd):
        o = self.options
        loss = sgd_epochs(model, self.x, self.y, epochs=o.epochs, batch_size=o.batch_size, lr=o.lr,
                          seed=o.seed * 1_000_003 + rnd, loss_fn=self.loss)
        return len(self.y), {"train_loss": loss}

    @torch.no_grad()
    def evaluate(self, model):
        if self.classify:
            return classification_metrics(model, self.x_test, self.y_test)
        model.eval()
        return {"mse": float(self.loss(model(self.x_test), self.y_test))}

    def sample_batch(self, k):
        return self.x[:k], self.y[:k]
