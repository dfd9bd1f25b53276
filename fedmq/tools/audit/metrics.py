"""Image similarity of a reconstruction to the true image: PSNR and SSIM.

SSIM follows Wang et al. (2004) with an 11x11 Gaussian window (sigma 1.5) and the
usual constants for a data range of 1; both work on (H, W) images in [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def psnr(rec: np.ndarray, true: np.ndarray) -> float:
    mse = float(np.mean((np.clip(rec, 0, 1) - true) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def ssim(rec: np.ndarray, true: np.ndarray, window: int = 11, sigma: float = 1.5) -> float:
    c1, c2 = 0.01**2, 0.03**2
    ax = torch.arange(window, dtype=torch.float64) - window // 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    w = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]
    a = torch.as_tensor(np.clip(rec, 0, 1), dtype=torch.float64)[None, None]
    b = torch.as_tensor(true, dtype=torch.float64)[None, None]
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    var_a = F.conv2d(a * a, w) - mu_a**2
    var_b = F.conv2d(b * b, w) - mu_b**2
    cov = F.conv2d(a * b, w) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())
