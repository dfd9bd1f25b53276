"""The batched sensitivity map equals a literal double-backward computation."""

import torch
from torch import nn
from torch.nn import functional as F

from fedmq.privacy.sensitivity import sensitivity_map
from fedmq.learning.models import layer_sizes


def _double_backward_reference(model, x, labels):
    """S_m = 1/K sum_k |d/dy_k (d loss / d w_m)|, with loss = sum_k y_k CE_k, by autograd twice."""
    params = list(model.parameters())
    n_classes = model[-1].out_features

    def grad_of_loss(y):
        log_p = F.log_softmax(model(x), dim=1)
        soft = y.unsqueeze(1) * F.one_hot(labels, n_classes).to(y.dtype)
        loss = -(soft * log_p).sum()
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)])

    y = torch.ones(len(labels), dtype=torch.float32, requires_grad=True)
    jac = torch.autograd.functional.jacobian(grad_of_loss, y)  # (M, K): d grad_m / d y_k
    return jac.abs().mean(dim=1).double().numpy()


def test_matches_double_backward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(9, 6)
    labels = torch.randint(0, 3, (9,))
    fast = sensitivity_map(model, x, labels, batch_size=4)
    ref = _double_backward_reference(model, x, labels)
    assert fast.shape == ref.shape == (sum(p.numel() for p in model.parameters()),)
    assert torch.allclose(torch.from_numpy(fast), torch.from_numpy(ref), rtol=1e-5, atol=1e-7)
    assert (fast > 0).any()


def test_matches_finite_difference_of_gradient():
    """d/dy_k of the gradient, by central differences in y_k, for one sample."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    labels = torch.tensor([0, 2])

    def gradient(y):
        loss = sum(y[k] * F.cross_entropy(model(x[k : k + 1]), labels[k : k + 1]) for k in range(2))
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])

    eps = 1e-6
    cols = []
    for k in range(2):
        up, down = torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
        up[k] += eps
        down[k] -= eps
        cols.append((gradient(up) - gradient(down)) / (2 * eps))
    fd = torch.stack(cols, dim=1).abs().mean(dim=1).numpy()
    fast = sensitivity_map(model, x, labels)
    assert abs(fast - fd).max() < 1e-6


def test_layer_sizes_group_weight_and_bias():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    assert layer_sizes(model) == [35, 18]
