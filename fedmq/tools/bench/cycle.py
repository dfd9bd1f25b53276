"""``fedmq bench cycle``: one agent training cycle, phase by phase, like seed 000's Fig. 8.

ResNet-18 on 32x32 images (scikit-learn's 8x8 digits, upsampled and repeated to 3
channels: real images, nothing downloaded) is trained for one local epoch on the
chosen device — CUDA with mixed precision when asked, as the ``gpu-server``
profile does — then, for each encrypted fraction p, the agent's own code paths
run: the sensitivity map (on the same device, for 0 < p < 1, where the mask needs
it), protection (the update moved to host memory once, the top-p parameters CKKS-
encrypted with TenSEAL on the CPU's cores, the rest float32) and serialization.
GPU timings synchronize the device before each clock stops.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass

import numpy as np

PS = (0.0, 0.1, 0.3, 1.0)


@dataclass
class CycleRow:
    device: str
    device_name: str
    model: str
    params: int
    p: float
    samples: int
    train_s: float
    sensitivity_s: float
    protect_s: float
    serialize_s: float
    total_s: float
    protection_share: float  # (sensitivity + protect + serialize) / total: what privacy costs in a cycle
    update_bytes: int
    cpu_count: int


def _images(n: int):
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    reps = -(-n // len(d.target))
    x = torch.tensor(np.tile(d.images, (reps, 1, 1))[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.tensor(np.tile(d.target, reps)[:n], dtype=torch.long)
    return x, y


def run(device: str = "cpu", ps: tuple[float, ...] = PS, samples: int = 512, batch_size: int = 64,
        sensitivity_samples: int = 64, mixed_precision: bool = True, progress: bool = True) -> list[CycleRow]:
    import torch
    from torch import nn
    from tqdm import tqdm

    from fedmq.privacy import he, masking, protection
    from fedmq.protocol import wire
    from fedmq.learning.models import resnet18
    from fedmq.learning.workloads.classifier_training import sgd_step
    from fedmq.privacy.sensitivity import sensitivity_map

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA asked for, but torch sees no GPU")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    amp = mixed_precision and dev.type == "cuda"
    torch.manual_seed(0)
    x, y = _images(samples)
    x, y = x.to(dev), y.to(dev)
    ctx = he.create_secret_context(he.CkksParams(), n_threads=os.cpu_count())
    rows: list[CycleRow] = []
    bar = tqdm(total=len(ps) * 4, desc=f"cycle on {device}", disable=None if progress else True)

    def train(model) -> np.ndarray:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scaler = torch.amp.GradScaler("cuda") if amp else None
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        perm = torch.randperm(samples, device=dev)
        for i in range(0, samples, batch_size):
            idx = perm[i:i + batch_size]
            sgd_step(model, opt, loss_fn, x[idx], y[idx], scaler)
        sync()
        return nn.utils.parameters_to_vector(model.parameters()).detach()

    warm = resnet18(in_channels=3).to(dev)  # CUDA context, cuDNN autotuning, allocator: not a cycle's cost
    train(warm)
    sensitivity_map(warm, x[:8], y[:8])
    sync()
    del warm

    for p in ps:
        model = resnet18(in_channels=3).to(dev)
        t0 = time.perf_counter()
        flat = train(model)
        t1 = time.perf_counter()
        bar.update(1)
        if 0 < p < 1:
            # One vmap batch on a GPU (K x params of per-sample gradients fit easily); 32 on a CPU.
            scores = sensitivity_map(model, x[:sensitivity_samples], y[:sensitivity_samples],
                                     batch_size=sensitivity_samples if dev.type == "cuda" else 32)
            sync()
            mask = masking.top_p_mask(scores, p)
        else:
            mask = np.full(flat.numel(), p >= 1)
        t2 = time.perf_counter()
        bar.update(1)
        weights = flat.cpu().double().numpy()  # to host memory, once
        update = protection.protect_ckks(ctx, weights, samples, mask, "float32", 8,
                                         masking.mask_digest(mask) if 0 < p < 1 else None)
        t3 = time.perf_counter()
        bar.update(1)
        _, body = wire.encode_body(update)
        t4 = time.perf_counter()
        bar.update(1)
        total = t4 - t0
        rows.append(CycleRow(device=dev.type, device_name=name, model="resnet18", params=flat.numel(), p=p,
                             samples=samples, train_s=t1 - t0, sensitivity_s=t2 - t1, protect_s=t3 - t2,
                             serialize_s=t4 - t3, total_s=total, protection_share=(t4 - t1) / total,
                             update_bytes=len(body), cpu_count=os.cpu_count() or 0))
        del model, update, body
    bar.close()
    return rows


def write(rows: list[CycleRow], json_out, png) -> None:
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"p={r.p:g}" for r in rows]
    bottom = np.zeros(len(rows))
    for phase in ("train_s", "sensitivity_s", "protect_s", "serialize_s"):
        vals = np.array([getattr(r, phase) for r in rows])
        ax.bar(labels, vals, bottom=bottom, label=phase[:-2])
        bottom += vals
    ax.set_ylabel("seconds per cycle")
    ax.set_title(f"ResNet-18 cycle on {rows[0].device_name}" if rows else "cycle")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
