"""The models fedmq trains and benchmarks (torch; never imported by the aggregator).

``cnn`` is the paper's "2 conv + 2 FC" CNN (seed 000, Table 8), the FedAvg MNIST
CNN: exactly 1,663,370 parameters. ``resnet18`` is the CIFAR-style ResNet-18
(3x3 stem, no max-pool) with 10 classes: 11,173,962 parameters. Written out here
because torchvision is not a dependency.
"""

from __future__ import annotations

from torch import nn


def mlp(n_in: int, hidden: list[int], n_out: int) -> nn.Module:
    layers: list[nn.Module] = []
    width = n_in
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


def linear(n_in: int = 784, n_out: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(n_in, n_out))


def lenet5(in_channels: int = 1, n_out: int = 10) -> nn.Module:
    """LeNet-5 on 32x32 inputs: 61,706 parameters with one input channel."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, n_out))


def cnn(n_out: int = 10) -> nn.Module:
    """2 conv + 2 FC on 28x28 inputs: 1,663,370 parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(7 * 7 * 64, 512), nn.ReLU(), nn.Linear(512, n_out))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


def resnet18(in_channels: int = 3, n_out: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, n_out)]
    return nn.Sequential(*layers)


BENCH_MODELS = {"linear": linear, "lenet5": lenet5, "cnn": cnn, "resnet18": resnet18}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_sizes(model: nn.Module) -> list[int]:
    """Parameter counts per module that owns parameters (a weight and its bias), in
    ``parameters()`` order: the unit of per-layer quantization settings and of the
    first/last-layer encryption recipe."""
    sizes = []
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own:
            sizes.append(sum(p.numel() for p in own))
    return sizes
