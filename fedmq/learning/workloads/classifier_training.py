"""What the built-in classifiers share: minibatch SGD over tensors held on the
device, accuracy and loss on a held-out split. A user's workload need not use it."""

from __future__ import annotations

import torch
from torch import nn


def sgd_epochs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
               seed: int, loss_fn=nn.functional.cross_entropy, amp: bool = False) -> float:
    """Local epochs of SGD with momentum, batches drawn by a seeded generator (a
    rerun of the same round trains the same way). Returns the last epoch's mean loss."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    model.train()
    last = 0.0
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen).to(x.device)
        total, batches = 0.0, 0
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            loss = sgd_step(model, opt, loss_fn, x[idx], y[idx], scaler)
            total, batches = total + float(loss.detach()), batches + 1
        last = total / max(batches, 1)
    return last


def sgd_step(model: nn.Module, opt, loss_fn, xb: torch.Tensor, yb: torch.Tensor, scaler=None) -> torch.Tensor:
    """One optimizer step; with a GradScaler, mixed precision on CUDA (fp16 matmuls,
    fp32 master weights). Returns the batch loss."""
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(model(xb), yb)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
    return loss


@torch.no_grad()
def classification_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    model.eval()
    out = model(x)
    return {"accuracy": float((out.argmax(dim=1) == y).float().mean()),
            "loss": float(nn.functional.cross_entropy(out, y))}


def split_indices(n: int, *, shard: int, num_shards: int, seed: int, test_fraction: float,
                  labels=None, alpha: float | None = None):
    """(test, mine): a task-wide test split the same on every agent, and this shard's
    part of the rest — IID, or Dirichlet(alpha) over labels per class (non-IID)."""
    import numpy as np

    if shard >= num_shards:
        raise ValueError(f"shard {shard} must be below num_shards {num_shards}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_test = int(round(n * test_fraction))
    test, rest = order[:n_test], order[n_test:]
    if alpha is None or labels is None:
        return test, np.array_split(rest, num_shards)[shard]
    mine = []
    for c in np.unique(labels[rest]):
        idx = rest[labels[rest] == c]
        cuts = (np.cumsum(rng.dirichlet([alpha] * num_shards)) * len(idx)).astype(int)[:-1]
        mine.append(np.split(idx, cuts)[shard])
    return test, np.sort(np.concatenate(mine))
