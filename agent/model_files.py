"""The trained model, out: the global model of a round as safetensors.

The aggregator never sees the model, so export happens where the keys are: on an
agent. After every adopted round the agent writes ``model.json`` (round, model
fingerprint, parameter layout, the workload's metrics) beside ``model.npz``; with
``checkpoints: K`` it also keeps the last K rounds as ``checkpoints/round-R.safetensors``
(+ ``.json``). ``fedmq model export`` turns a state directory into a safetensors file
that loads with ``load_state_dict`` into the workload's model — no fedmq import needed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from fedmq.runtime.private_files import write_private

INFO = "model.json"


def _state_dict(weights: np.ndarray, layout: list) -> dict[str, np.ndarray]:
    out, pos = {}, 0
    for name, shape, dtype in layout:
        n = math.prod(shape)
        out[name] = np.ascontiguousarray(weights[pos:pos + n].reshape(shape).astype(dtype))
        pos += n
    if pos != weights.size:
        raise ValueError(f"layout covers {pos} values, the model has {weights.size}")
    return out


def save(state_dir: Path, rnd: int, weights: np.ndarray, trainer, metrics: dict[str, float], *,
         keep_checkpoints: int | None) -> None:
    """The adopted global model: ``model.npz`` (atomically: a crash leaves the old or
    the new, and a restart resumes from it), ``model.json``, and a checkpoint if kept."""
    tmp = state_dir / "model.tmp.npz"
    np.savez(tmp, version=rnd, weights=weights)
    os.replace(tmp, state_dir / "model.npz")
    info = {"round": rnd, "fingerprint": trainer.fingerprint.hex(), "workload": trainer.settings.name,
            "layout": [[n, list(s), d] for n, s, d in trainer.layout], "metrics": metrics}
    write_private(state_dir / INFO, json.dumps(info).encode())
    if keep_checkpoints:
        from safetensors.numpy import save_file

        ckpt = state_dir / "checkpoints"
        ckpt.mkdir(mode=0o700, exist_ok=True)
        save_file(_state_dict(weights, info["layout"]), str(ckpt / f"round-{rnd}.safetensors"),
                  metadata={"round": str(rnd), "fingerprint": info["fingerprint"]})
        (ckpt / f"round-{rnd}.safetensors").chmod(0o600)
        write_private(ckpt / f"round-{rnd}.json", json.dumps(info).encode())
        rounds = sorted(int(p.stem.split("-")[1]) for p in ckpt.glob("round-*.safetensors"))
        for old in rounds[:-keep_checkpoints]:
            (ckpt / f"round-{old}.safetensors").unlink(missing_ok=True)
            (ckpt / f"round-{old}.json").unlink(missing_ok=True)


def export(state_dir: Path, out: Path, rnd: int | None = None) -> dict:
    """Write the latest global model (or round ``rnd``'s checkpoint) to ``out``
    (safetensors) and ``out`` with ``.json`` (round, metrics, fingerprint); returns that info."""
    from safetensors.numpy import save_file

    state_dir = Path(state_dir)
    info_path = state_dir / INFO
    if not info_path.exists():
        raise FileNotFoundError(f"{state_dir}: no {INFO} — has this agent adopted a round's result yet?")
    info = json.loads(info_path.read_text())
    if rnd is None or rnd == info["round"]:
        saved = np.load(state_dir / "model.npz")
        if int(saved["version"]) != info["round"]:
            raise ValueError(f"{state_dir}: model.npz holds round {int(saved['version'])}, {INFO} round "
                             f"{info['round']} (the agent was writing them; try again)")
        tensors = _state_dict(saved["weights"], info["layout"])
    else:
        ckpt = state_dir / "checkpoints" / f"round-{rnd}.safetensors"
        if not ckpt.exists():
            kept = sorted(p.stem for p in (state_dir / "checkpoints").glob("round-*.safetensors"))
            raise FileNotFoundError(f"no checkpoint of round {rnd} in {state_dir} (kept: {kept or 'none'}; "
                                    "set checkpoints: K in the agent's config to keep rounds)")
        from safetensors.numpy import load_file

        tensors = load_file(str(ckpt))
        info = json.loads(ckpt.with_suffix(".json").read_text())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"round": str(info["round"]), "fingerprint": info["fingerprint"]})
    meta = {k: info[k] for k in ("round", "workload", "fingerprint", "metrics")}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
