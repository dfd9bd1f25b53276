"""``image-folder``: an image classifier over a directory in the usual
class-per-subfolder layout (``data_dir/<class>/*.png``). ``model: cnn`` is the
FedML-HE paper's CNN (2 conv + 2 FC, 1,663,370 parameters on 28x28 grey images);
``model: small`` a little CNN for small devices. Images are read with Pillow
(no torchvision needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedmq.learning.models import cnn
from fedmq.learning.workload import Workload
from fedmq.learning.workloads.classifier_training import classification_metrics, sgd_epochs, split_indices

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    classes: list[str] | None = None  # fixed order on every agent; default: the sorted subfolder names
    model: Literal["cnn", "small"] = "cnn"
    test_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0)


def small_cnn(n_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(16 * 7 * 7, n_out))


def read_images(root: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    xs, ys = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() in SUFFIXES:
                img = Image.open(path).convert("L").resize((28, 28))
                xs.append(np.asarray(img, dtype=np.float32) / 255.0)
                ys.append(label)
    if not xs:
        raise ValueError(f"{root}: no images in class subfolders {classes}")
    return np.stack(xs)[:, None], np.array(ys)


class ImageFolder(Workload):
    Options = Options

    def __init__(self, data_dir, options: Options, device: str) -> None:
        super().__init__(data_dir, options, device)
        if data_dir is None:
            raise ValueError("the image-folder workload needs workload.data_dir")
        root = Path(data_dir)
        self.classes = options.classes or sorted(p.name for p in root.iterdir() if p.is_dir())
        x, y = read_images(root, self.classes)
        test, mine = split_indices(len(y), shard=0, num_shards=1, seed=options.seed,
                                   test_fraction=options.test_fraction)
        self.x, self.y = torch.from_numpy(x[mine]).to(device), torch.from_numpy(y[mine]).long().to(device)
        self.num_samples = len(mine)
        self.x_test, self.y_test = torch.from_numpy(x[test]).to(device), torch.from_numpy(y[test]).long().to(device)

    def build_model(self) -> nn.Module:
        n = len(self.classes)
        return cnn(n) if self.options.model == "cnn" else small_cnn(n)

    def train(self, model, rnd):
        o = self.options
        loss = sgd_epochs(model, self.x, self.y, epochs=o.epochs, batch_size=o.batch_size, lr=o.lr,
                          seed=o.seed * 1_000_003 + rnd)
        return len(self.y), {"train_loss": loss}

    def evaluate(self, model):
        return classification_metrics(model, self.x_test, self.y_test)

    def sample_batch(self, k):
        return self.x[:k], self.y[:k]
