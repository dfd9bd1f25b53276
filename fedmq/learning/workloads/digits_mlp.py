"""``digits-mlp``: an MLP on scikit-learn's handwritten digits (shipped with the
package, nothing downloaded), on this agent's IID or Dirichlet(alpha) shard."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from fedmq.learning.models import mlp
from fedmq.learning.workload import Workload
from fedmq.learning.workloads.classifier_training import classification_metrics, sgd_epochs, split_indices


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: list[int] = [64, 32]
    shard: int = Field(0, ge=0)
    num_shards: int = Field(1, ge=1)
    partition: Literal["iid", "dirichlet"] = "iid"
    alpha: float = Field(0.5, gt=0)  # Dirichlet concentration: smaller is more skewed
    seed: int = 0
    test_fraction: float = Field(0.2, gt=0, lt=1)
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.1, gt=0)
    mixed_precision: bool = False


class DigitsMlp(Workload):
    Options = Options

    def __init__(self, data_dir, options: Options, device: str) -> None:
        from sklearn.datasets import load_digits

        super().__init__(data_dir, options, device)
        x, y = load_digits(return_X_y=True)
        x = (x / 16.0).astype(np.float32)
        test, mine = split_indices(len(y), shard=options.shard, num_shards=options.num_shards, seed=options.seed,
                                   test_fraction=options.test_fraction, labels=y,
                                   alpha=options.alpha if options.partition == "dirichlet" else None)
        self.x, self.y = torch.from_numpy(x[mine]).to(device), torch.from_numpy(y[mine]).long().to(device)
        self.num_samples = len(mine)
        self.x_test, self.y_test = torch.from_numpy(x[test]).to(device), torch.from_numpy(y[test]).long().to(device)
        self.seed = options.seed * 1_000_003 + options.shard

    def build_model(self) -> torch.nn.Module:
        return mlp(64, list(self.options.hidden), 10)

    def train(self, model, rnd):
        o = self.options
        loss = sgd_epochs(model, self.x, self.y, epochs=o.epochs, batch_size=o.batch_size, lr=o.lr,
                          seed=self.seed + rnd, amp=o.mixed_precision and self.device == "cuda")
        return len(self.y), {"train_loss": loss}

    def evaluate(self, model):
        return classification_metrics(model, self.x_test, self.y_test)

    def sample_batch(self, k):
        return self.x[:k], self.y[:k]
