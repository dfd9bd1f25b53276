"""DLG (Zhu et al., 2019) and iDLG (Zhao et al., 2020) against one observed view.

Both optimize a dummy image (and for DLG a dummy label; a batch of them for an
aggregate, aggregate.py) so that its gradient
matches what the attacker observed, on the visible coordinates only, with L-BFGS
as in the papers. iDLG first reads the label off the last layer's weight
gradient — the true class's row is the only negative one under softmax
cross-entropy with non-negative inputs — and falls back to DLG's joint label
search when that layer is not visible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedmq.tools.audit.views import View


def lenet_sigmoid(n_out: int = 10) -> nn.Module:
    """The LeNet of the DLG paper (sigmoid: twice differentiable everywhere), 32x32x1."""
    return nn.Sequential(
        nn.Conv2d(1, 12, 5, padding=2, stride=2), nn.Sigmoid(),
        nn.Conv2d(12, 12, 5, padding=2, stride=2), nn.Sigmoid(),
        nn.Conv2d(12, 12, 5, padding=2, stride=1), nn.Sigmoid(),
        nn.Flatten(), nn.Linear(12 * 8 * 8, n_out))


def _distance(flat: torch.Tensor, view: View, sizes: list[int]) -> torch.Tensor:
    vis = view.visible
    if view.loss == "l2":
        return ((flat[vis] - view.target[vis]) ** 2).sum()
    total, start = flat.new_zeros(()), 0
    for size in sizes:  # per-layer cosine: the codes' unknown scale and offset cancel
        sl = slice(start, start + size)
        m = vis[sl]
        if m.sum() > 1:
            total = total + 1 - F.cosine_similarity(flat[sl][m], view.target[sl][m], dim=0)
        start += size
    return total


def infer_label(view: View, sizes: list[int], n_classes: int) -> int | None:
    """iDLG's rule on the last linear layer's weights, if the attacker can see them."""
    w_start = sum(sizes[:-2])
    rows = view.target[w_start:w_start + sizes[-2]].reshape(n_classes, -1)
    vis = view.visible[w_start:w_start + sizes[-2]].reshape(n_classes, -1)
    if vis.float().mean() < 0.5:
        return None
    sums = (rows * vis).sum(dim=1)  # codes arrive centered (views.py), so signs survive quantization
    return int(torch.argmin(sums))


def reconstruct(model: nn.Module, view: View, sizes: list[int], shape: tuple[int, ...], *, iterations: int,
                seed: int, label: int | None = None, n_classes: int = 10) -> tuple[torch.Tensor, float]:
    """The dummy images (a batch of ``shape[0]``, with one soft label each: their summed
    loss's gradient is matched) with the lowest matching loss seen, and that loss.
    ``label`` (iDLG) fixes the label of a single dummy."""
    gen = torch.Generator().manual_seed(seed)
    dummy_x = torch.rand(shape, generator=gen).requires_grad_(True)
    dummy_y = torch.randn(shape[0], n_classes, generator=gen).requires_grad_(label is None)
    params = list(model.parameters())
    opt = torch.optim.LBFGS([dummy_x, dummy_y] if label is None else [dummy_x], lr=1.0, max_iter=iterations,
                            history_size=100, line_search_fn="strong_wolfe", tolerance_grad=1e-12,
                            tolerance_change=1e-14)
    best = [float("inf"), dummy_x.detach().clone()]

    def closure():
        opt.zero_grad()
        out = model(dummy_x)
        if label is None:
            loss = torch.sum(-F.softmax(dummy_y, dim=-1) * F.log_softmax(out, dim=-1))
        else:
            loss = F.cross_entropy(out, torch.tensor([label]))
        grads = torch.autograd.grad(loss, params, create_graph=True)
        d = _distance(torch.cat([g.reshape(-1) for g in grads]), view, sizes)
        d.backward()
        val = d.item()
        if val == val and val < best[0]:  # not NaN
            best[0], best[1] = val, dummy_x.detach().clone()
        return d

    try:
        opt.step(closure)
    except RuntimeError:
        pass  # a diverged line search: keep the best seen
    return best[1].clamp(0, 1), best[0]
