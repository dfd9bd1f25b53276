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

import re
import statistics

import numpy as np
import torch
from torch import nn

from fedmq.privacy import exposure
from fedmq.tools.audit import aggregate, metrics
from fedmq.tools.audit.attacks import infer_label, lenet_sigmoid, reconstruct
from fedmq.tools.audit.views import make_view, modes, parse


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(d.target)


def _victim_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = lenet_sigmoid()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5)
    return model


def _stats(values: list[float]) -> dict:
    return {"psnr_mean": statistics.mean(values), "psnr_best": max(values)}


def run(*, seeds: int = 3, iterations: int = 300, quick: bool = False, progress: bool = True,
        only: list[str] | None = None, ks: tuple[int, ...] | None = None,
        dp_epsilons: tuple[float, ...] = (8.0,), round_size: int = 4) -> dict:
    """``ks``: aggregate sizes (default 1, 4; full 1, 4, 8; () skips the aggregate attack);
    the DP aggregate runs at the largest k for each of ``dp_epsilons``; ``round_size``: the
    agents of the masked round a single upload is attacked in."""
    from tqdm import tqdm

    from fedmq.privacy.sensitivity import sensitivity_map

    torch.set_num_threads(max(1, torch.get_num_threads()))
    xs, ys = _digits()
    mode_list = only or modes(quick)
    ks = tuple(sorted((1, 4) if quick else (1, 4, 8))) if ks is None else tuple(sorted(ks))
    dp_runs = [(max(ks), eps) for eps in dp_epsilons] if ks else []
    rows, agg_rows, grid = [], [], {}
    random_psnr = []
    combos = [(m, t) for m in mode_list
              for t in (("drop", "zero") if parse(m).p > 0 and not parse(m).masked else ("drop",))]
    agg_runs = [(m, k, None) for m in mode_list for k in ks] + [(m, k, e) for m in mode_list for k, e in dp_runs]
    bar = tqdm(total=seeds * (len(combos) * 2 + len(agg_runs)), desc="privacy audit",
               disable=None if progress else True)
    for seed in range(seeds):
        model = _victim_model(seed)
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
            view = make_view(mode, grad, sizes, scores, seed, treatment, round_size)
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
        for mode, k, eps in agg_runs:  # agents 0..k-1 hold the batch's first k images (agent 0: the victim)
            row = aggregate.attack(model, mode, xs[batch[:k]], ys[batch[:k]], scores, seed,
                                   iterations=iterations, dp_epsilon=eps)
            first = row.pop("_first")
            if seed == 0 and k == max(ks):
                grid[(mode, "aggregate" if eps is None else f"dp{eps:g}")] = first
            agg_rows.append(row)
            bar.update(1)
    bar.close()
    summary: dict = {}
    for mode in mode_list:
        entry: dict = {}
        for treatment, into in (("drop", entry), ("zero", entry.setdefault("zero_guess", {}))):
            for attack in ("dlg", "idlg"):
                sel = [r for r in rows if r["mode"] == mode and r["attack"] == attack and r["treatment"] == treatment]
                if sel:
                    into[attack] = {**_stats([r["psnr"] for r in sel]),
                                    "ssim_mean": statistics.mean(r["ssim"] for r in sel),
                                    "ssim_best": max(r["ssim"] for r in sel)}
        if not entry["zero_guess"]:
            del entry["zero_guess"]
        for k, eps in [(k, None) for k in ks] + dp_runs:
            sel = [r for r in agg_rows if r["mode"] == mode and r["k"] == k
                   and (r["dp"] or {}).get("epsilon") == eps]
            key = f"k={k}" if eps is None else f"k={k},epsilon={eps:g}"
            entry.setdefault("aggregate" if eps is None else "aggregate_dp", {})[key] = {
                **_stats([r["psnr_mean"] for r in sel]),
                "mean_image_psnr": statistics.mean(r["mean_image_psnr"] for r in sel),
                **({"clip": "median L2 norm of the k updates",
                    "noise_multiplier": sel[0]["dp"]["noise_multiplier"],
                    "noise_std_sum_mean": statistics.mean(r["dp"]["noise_std_sum"] for r in sel)} if eps else {})}
        summary[mode] = entry
    settings = {"seeds": seeds, "iterations": iterations, "model": "LeNet (DLG, sigmoid), 32x32x1",
                "params": sum(p.numel() for p in lenet_sigmoid().parameters()),
                "data": "scikit-learn digits upsampled to 32x32",
                "headline": "drop-aware DLG PSNR: the attacker knows the layout (the aggregator does) and "
                            "leaves encrypted coordinates out of its matching loss",
                "encrypted_parts": "two attackers: 'drop' (headline) leaves them out of the matching loss, "
                                   "'zero' (secondary) guesses 0 for them",
                "quantized_parts": "per-layer cosine on centered codes (plan unknown)",
                "masked_parts": f"one agent's upload in a round of {round_size} (real X25519 keys, agent_mask), "
                                "ring integers read as signed, per-layer cosine",
                "aggregate": f"sum of k single-sample updates, k in {list(ks)}, batch DLG with k dummies; "
                             "score: per true image the best PSNR over the batch, mean over images",
                "dp": f"each update clipped to the median L2 norm of the k updates, noise share "
                      f"client_dp.noise_std with noise_agents=k (sum: noise_multiplier * clip), "
                      f"noise_multiplier = client_dp.calibrate(epsilon, {aggregate.DP_DELTA:g}, rounds="
                      f"{aggregate.DP_ROUNDS}), at k={max(ks) if ks else None}, epsilon in {list(dp_epsilons)}"}
    result = {"settings": settings, "random_image_psnr": statistics.mean(random_psnr), "summary": summary,
              "rows": rows, "aggregate_rows": agg_rows, "_grid": grid}
    result["table"] = table(result)
    return result


def bytes_per_param(mode: str) -> str:
    """What travels per parameter where it follows from the wire format alone; ciphertext
    sizes depend on the HE parameters and are measured by ``fedmq bench he``."""
    m = parse(mode)
    if m.p > 0:
        return "see bench he"
    if m.codes:  # int8 codes; masked: the ring of their sum (sum_dtype: 2 bytes up to 256 agents)
        return "2" if m.masked else "1"
    return "4" if not m.masked else "4 (ring32)"


def table(result: dict) -> list[dict]:
    """One row per mode, the drop-aware figure first: what the README quotes."""
    out = []
    for mode, v in result["summary"].items():
        agg = v.get("aggregate", {})
        dp = v.get("aggregate_dp", {})
        last_k = list(agg)[-1] if agg else None
        out.append({
            "mode": mode,
            "aggregator_sees": exposure.aggregator_view(parse(mode).protection()),
            "bytes_per_param": bytes_per_param(mode),
            "dlg_psnr_drop_aware": v["dlg"]["psnr_mean"],
            "dlg_psnr_zero_guess": v["zero_guess"]["dlg"]["psnr_mean"] if "zero_guess" in v else None,
            **{f"dlg_psnr_aggregate_{k.replace('=', '')}": a["psnr_mean"] for k, a in agg.items()},
            "aggregate_k": None if last_k is None else int(last_k.split("=")[1]),
            **{f"dlg_psnr_dp_{k.replace('=', '').replace(',', '_')}": a["psnr_mean"] for k, a in dp.items()},
            "idlg_psnr_drop_aware": v["idlg"]["psnr_mean"],
        })
    return out


def markdown(result: dict, command: str) -> str:
    """The table ready to paste in the README, with the command that measured it."""
    s = result["settings"]
    rows = result["table"]
    agg_cols = [c for c in rows[0] if c.startswith("dlg_psnr_aggregate_")] if rows else []
    dp_cols = [c for c in rows[0] if c.startswith("dlg_psnr_dp_")] if rows else []
    head = ["mode", "what the aggregator sees", "bytes/param", "DLG PSNR drop-aware (one update)",
            *[f"DLG PSNR aggregate of {c.rsplit('_k', 1)[1]}" for c in agg_cols],
            *["DLG PSNR DP aggregate (k={}, ε={})".format(*re.fullmatch(r"dlg_psnr_dp_k(\d+)_epsilon(.+)", c).groups())
              for c in dp_cols], "iDLG PSNR drop-aware", "DLG PSNR zero-guess"]

    def cell(x) -> str:
        return "-" if x is None else f"{x:.1f}" if isinstance(x, float) else str(x)

    lines = [f"Measured with `{command}` ({s['seeds']} seeds, {s['iterations']} L-BFGS iterations; "
             f"{s['model']}, {s['data']}; a random image scores {result['random_image_psnr']:.1f} dB; "
             "PSNR in dB, higher = more leaked).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = [r["mode"], r["aggregator_sees"], r["bytes_per_param"], r["dlg_psnr_drop_aware"],
                *[r[c] for c in agg_cols], *[r[c] for c in dp_cols], r["idlg_psnr_drop_aware"],
                r["dlg_psnr_zero_guess"]]
        lines.append("| " + " | ".join(cell(v) for v in vals) + " |")
    means = {k: statistics.mean(r["mean_image_psnr"] for r in result["aggregate_rows"] if r["k"] == k)
             for k in sorted({r["k"] for r in result.get("aggregate_rows", [])})}
    baseline = ", ".join(f"k={k}: {v:.1f} dB" for k, v in means.items() if k > 1)
    lines += ["", f"Aggregate: {s['aggregate']}" + (f" (the mean of the k true images scores {baseline}: an "
                                                    "aggregate figure near it is an average digit, not an inversion)"
                                                    if baseline else "") + f". DP: {s['dp']}. Masked single upload: {s['masked_parts']}. "
              "bytes/param: what travels per parameter where the wire format fixes it (float32 = 4, int8 "
              "code = 1, masked code = 2); modes with ciphertexts: `fedmq bench he`."]
    return "\n".join(lines) + "\n"


def plot(result: dict, png) -> None:
    """Seed 0's reconstructions: the true image once on top, then one row per mode with
    the drop-aware DLG and iDLG of one update and the aggregate's best match to it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = result["_grid"]
    true = grid["true"]
    combos = list(dict.fromkeys((k[0], k[1]) for k in grid if k != "true" and len(k) == 3))
    extra = list(dict.fromkeys(k[1] for k in grid if k != "true" and len(k) == 2))
    cols = [("dlg", "DLG"), ("idlg", "iDLG")] + [(e, "DLG aggregate" if e == "aggregate" else
                                                  f"DLG DP (ε={e[2:]}) aggregate") for e in extra]
    k = max((r["k"] for r in result.get("aggregate_rows", [])), default=None)
    fig, axes = plt.subplots(len(combos) + 1, len(cols), figsize=(1.7 * len(cols) + 0.9, 1.45 * (len(combos) + 1)),
                             constrained_layout=True, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[0]:
        ax.axis("off")
    axes[0, 0].axis("on")
    axes[0, 0].imshow(true, cmap="gray", vmin=0, vmax=1)
    axes[0, 0].set_title("true image (agent 0)", fontsize=7)
    for i, (mode, treatment) in enumerate(combos, start=1):
        for j, (key, name) in enumerate(cols):
            ax = axes[i, j]
            img = grid.get((mode, treatment, key)) if key in ("dlg", "idlg") else \
                grid.get((mode, key)) if treatment == "drop" else None
            if img is None:
                ax.axis("off")
                continue
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            label = name if key in ("dlg", "idlg") else f"{name} of {k}"
            ax.set_title(f"{label} {metrics.psnr(img, true):.1f} dB", fontsize=6)
        axes[i, 0].set_ylabel(mode + ("" if treatment == "drop" else "\n(zero-guess)"), fontsize=6)
    fig.suptitle("Reconstructions from what the aggregator sees (seed 0; drop-aware unless marked)", fontsize=8)
    fig.savefig(png, dpi=130)
    plt.close(fig)
