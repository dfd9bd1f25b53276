"""How long one agent's sensitivity map takes, per model, for ``fedmq bench he``."""

from __future__ import annotations

import time

import numpy as np


INPUT_SHAPES = {"linear": (784,), "lenet5": (1, 32, 32), "cnn": (1, 28, 28), "resnet18": (3, 32, 32)}


def sensitivity_timing(models: list[str], samples: int = 64) -> list[dict]:
    """Seconds for one agent's sensitivity map (seed 000, step 1) on K random inputs."""
    import torch

    from fedmq.learning.models import BENCH_MODELS, n_params
    from fedmq.privacy.sensitivity import sensitivity_map

    out = []
    for name in models:
        torch.manual_seed(0)
        model = BENCH_MODELS[name]()
        x = torch.randn(samples, *INPUT_SHAPES[name])
        y = torch.randint(0, 10, (samples,))
        t0 = time.perf_counter()
        scores = sensitivity_map(model, x, y, batch_size=16)
        out.append({"model": name, "params": n_params(model), "samples": samples,
                    "seconds": time.perf_counter() - t0, "finite": bool(np.isfinite(scores).all()),
                    "torch_threads": torch.get_num_threads()})
    return out
