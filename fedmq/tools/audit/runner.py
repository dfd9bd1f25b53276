"""Run DLG and iDLG under every protection mode and summarize what leaks.

Each seed picks a real image (scikit-learn's digits, upsampled to 32x32), a fresh
LeNet (weights uniform in [-0.5, 0.5], as in the DLG paper), and the victim's
single-sample gradient; the sensitivity map for selective encryption is computed
by the product's own code over the victim's 64-sample local batch (the target
included). For each mode the attacker gets the view the aggregator would get and
runs both attacks; PSNR and SSIM are taken against the true image. A uniformly
random image's PSNR is reported alongside: "at the level of a random image" means
no better than that.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

import numpy as np
import torch
from torch import nn

from fedmq.tools.audit import metrics
from fedmq.tools.audit.attacks import infer_label, lenet_sigmoid, reconstruct
from fedmq.tools.audit.views import make_view, modes


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(d.target)


def run(*, seeds: int = 3, iterations: int = 300, quick: bool = False, progress: bool = True,
        only: list[str] | None = None) -> dict:
    from tqdm import tqdm

    from fedmq.privacy.sensitivity import sensitivity_map

    torch.set_num_threads(max(1, torch.get_num_threads()))
    xs, ys = _digits()
    mode_list = only or modes(quick)
    rows, grid = [], {}
    random_psnr = []
    combos = [(m, t) for m in mode_list for t in (("drop", "zero") if "-p" in m else ("drop",))]
    bar = tqdm(total=seeds * len(combos) * 2, desc="privacy audit", disable=None if progress else True)
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = lenet_sigmoid()
        with torch.no_grad():
            for p in model.parameters():
                p.uniform_(-0.5, 0.5)
        rng = np.random.default_rng(seed)
        batch = torch.as_tensor(rng.choice(len(ys), size=64, replace=False))
        x_true, y_true = xs[batch[:1]], ys[batch[:1]]
        sizes = [p.numel() for p in model.parameters()]
        loss = nn.functional.cross_entropy(model(x_true), y_true)
        grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]).numpy()
        scores = sensitivity_map(model, xs[batch], ys[batch])
        true_img = x_true[0, 0].numpy()
        random_psnr.append(metrics.psnr(rng.random(true_img.shape), true_img))
        if seed == 0:
            grid["true"] = true_img
        for mode, treatment in combos:
            view = make_view(mode, grad, sizes, scores, seed, treatment)
            for attack in ("dlg", "idlg"):
                label = infer_label(view, sizes, 10) if attack == "idlg" else None
                rec, match = reconstruct(model, view, sizes, tuple(x_true.shape), iterations=iterations,
                                         seed=1000 + seed, label=label)
                img = rec[0, 0].numpy()
                rows.append({"seed": seed, "mode": mode, "attack": attack, "treatment": treatment,
                             "encrypted_fraction": view.encrypted_fraction,
                             "psnr": metrics.psnr(img, true_img), "ssim": metrics.ssim(img, true_img),
                             "match_loss": match, "label_inferred": label,
                             "label_correct": None if label is None else label == int(y_true)})
                if seed == 0:
                    grid[(mode, treatment, attack)] = img
                bar.update(1)
    bar.close()
    summary: dict = defaultdict(dict)
    for mode, treatment in combos:
        key = mode if treatment == "drop" else f"{mode} (zero-guess)"
        for attack in ("dlg", "idlg"):
            sel = [r for r in rows if r["mode"] == mode and r["attack"] == attack and r["treatment"] == treatment]
            summary[key][attack] = {"psnr_mean": statistics.mean(r["psnr"] for r in sel),
                                    "psnr_best": max(r["psnr"] for r in sel),
                                    "ssim_mean": statistics.mean(r["ssim"] for r in sel),
                                    "ssim_best": max(r["ssim"] for r in sel)}
    return {"settings": {"seeds": seeds, "iterations": iterations, "model": "LeNet (DLG, sigmoid), 32x32x1",
                         "params": sum(p.numel() for p in lenet_sigmoid().parameters()),
                         "data": "scikit-learn digits upsampled to 32x32", "encrypted_parts": "two attackers: "
                         "'drop' leaves them out of the matching loss, 'zero' guesses 0 for them", "quantized_parts": "per-layer cosine on centered codes (plan unknown)"},
            "random_image_psnr": statistics.mean(random_psnr), "summary": dict(summary), "rows": rows,
            "_grid": grid}


def plot(result: dict, png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = result["_grid"]
    keys = [k for k in grid if k != "true"]
    combos = list(dict.fromkeys((m, t) for m, t, _ in keys))
    fig, axes = plt.subplots(len(combos), 3, figsize=(5.2, 1.75 * len(combos)))
    for i, (mode, treatment) in enumerate(combos):
        cells = [("true image", grid["true"])] + [
            (f"{a.upper()} {metrics.psnr(grid[(mode, treatment, a)], grid['true']):.1f} dB",
             grid[(mode, treatment, a)]) for a in ("dlg", "idlg")]
        for j, (title, img) in enumerate(cells):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=7)
        axes[i, 0].set_ylabel(mode + ("" if treatment == "drop" else "\n(zero-guess)"), fontsize=6)
    fig.suptitle("Reconstructions from what the aggregator sees (seed 0)", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=130)
    plt.close(fig)
