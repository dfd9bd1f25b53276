"""Per-parameter privacy sensitivity (seed 000, section 2.4, step 1).

    S_m = 1/K * sum_k | d/dy_k ( d loss(X, y, W) / d w_m ) |

What ``y_k`` is for a classifier (the paper is terse): we take the loss as
cross-entropy with *soft* targets, ``loss = sum_k y_k * CE(f(x_k), c_k)``, where
``y_k`` is the target weight of sample k's true class ``c_k`` (1 for the data as
given). The loss is linear in each ``y_k``, so the mixed derivative is exactly

    d/dy_k ( d loss / d w_m ) = d CE(f(x_k), c_k) / d w_m,

the per-sample gradient: how strongly the gradient a client would share moves
with that sample's label — which is what gradient-inversion attacks exploit.
That identity lets us compute S for all M parameters and K samples with one
batched per-sample-gradient pass (``torch.func.vmap(grad(...))``) instead of K
double-backward passes; ``tests/test_sensitivity.py`` checks the two agree with
a literal double-backward Jacobian on a small model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F


def sensitivity_map(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 32,
                    progress=None, loss_fn=F.cross_entropy) -> np.ndarray:
    """S_m for every parameter, flattened in ``model.parameters()`` order (float64).
    ``loss_fn(outputs, targets)``: the workload's mean loss, applied to one sample at a time."""
    was_training = model.training
    model.eval()  # batch statistics of one sample are meaningless (BatchNorm)
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def sample_loss(p, xk, yk):
        logits = functional_call(model, (p, buffers), (xk.unsqueeze(0),))
        return loss_fn(logits, yk.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    totals = {name: torch.zeros_like(p) for name, p in params.items()}
    for i in range(0, len(y), batch_size):
        grads = per_sample(params, x[i : i + batch_size], y[i : i + batch_size])
        for name, g in grads.items():
            totals[name] += g.abs().sum(dim=0)
        if progress is not None:
            progress.update(min(batch_size, len(y) - i))
    model.train(was_training)
    flat = torch.cat([totals[name].reshape(-1) for name, _ in model.named_parameters()])
    return (flat / len(y)).double().cpu().numpy()
