"""The workload API: the one thing a user writes to train *their* model on *their*
device's data with fedmq.

A workload is a class with five methods (subclass :class:`Workload` or just match
it — Flower's NumPyClient and FLARE's Client API inspired it, kept smaller)::

    class MyWorkload(Workload):
        def __init__(self, data_dir, options, device):   # load this device's data
        def build_model(self) -> torch.nn.Module          # the same architecture on every agent
        def train(self, model, rnd) -> (num_samples, {metric: value})   # one round, in place
        def evaluate(self, model) -> {metric: value}      # "accuracy" is plotted if present
        def loss(self, outputs, targets) -> torch.Tensor  # mean loss: the sensitivity map's
        def sample_batch(self, k) -> (x, y)               # k local samples for that map
        num_samples: int                                  # local training samples (FedAvg weight)

Everything else is the agent's: flattening the parameters in a fixed order, the
identical initial model, protection, chunking, upload, decryption, telemetry.
A task names its workload in the agent's YAML (``workload: {name: …, options: …,
data_dir: …}``) as a built-in name, ``module:attribute``, or an installed entry
point of the group ``fedmq.workloads``. ``options`` are free-form: a workload that
sets ``Options`` (a pydantic model) gets them validated.

This module imports no torch: resolving a reference at start-up costs nothing, and
torch is imported when the first round arrives.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any

ENTRY_POINT_GROUP = "fedmq.workloads"
BUILTIN = {
    "digits-mlp": "fedmq.learning.workloads.digits_mlp:DigitsMlp",
    "image-folder": "fedmq.learning.workloads.image_folder:ImageFolder",
    "csv": "fedmq.learning.workloads.csv_table:CsvTable",
}


class WorkloadError(ValueError):
    """A workload that cannot be found, imported or validated; the text says which and why."""


class Workload:
    """Base class with the defaults most classifiers want; override what differs."""

    Options: Any = None  # a pydantic model to validate ``options`` with, or None for a plain dict
    num_samples: int = 0  # set it when the data is loaded; ``train``'s count replaces it

    def __init__(self, data_dir: Path | None, options: Any, device: str) -> None:
        self.data_dir, self.options, self.device = data_dir, options, device

    def build_model(self):
        raise NotImplementedError

    def train(self, model, rnd: int) -> tuple[int, dict[str, float]]:
        raise NotImplementedError

    def evaluate(self, model) -> dict[str, float]:
        raise NotImplementedError

    def loss(self, outputs, targets):
        from torch.nn import functional as F

        return F.cross_entropy(outputs, targets)

    def sample_batch(self, k: int):
        raise NotImplementedError


def target_of(ref: str) -> str:
    """``module:attribute`` for a built-in name, an entry point, or a reference as given."""
    if ref in BUILTIN:
        return BUILTIN[ref]
    if ":" in ref:
        return ref
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == ref:
            return ep.value
    raise WorkloadError(f"workload {ref!r}: not a built-in ({', '.join(BUILTIN)}), not module:attribute, and no "
                        f"installed entry point of group {ENTRY_POINT_GROUP!r} has that name")


def check_reference(ref: str) -> str:
    """Find the workload's module without importing it (start-up: no torch yet)."""
    target = target_of(ref)
    module = target.split(":", 1)[0]
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        found, why = None, str(exc)
    else:
        why = "no such module on the Python path"
    if found is None:
        raise WorkloadError(f"workload {ref!r}: cannot find module {module!r} ({why})")
    return target


def load(ref: str, data_dir: Path | None, options: dict, device: str):
    """Import, validate the options and construct the workload."""
    target = check_reference(ref)
    module_name, _, attr = target.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # the user's module may raise anything on import
        raise WorkloadError(f"workload {ref!r}: importing {target} failed: {type(exc).__name__}: {exc}") from exc
    missing = [m for m in ("build_model", "train", "evaluate", "sample_batch") if not callable(getattr(obj, m, None))]
    if missing:
        raise WorkloadError(f"workload {ref!r} ({target}) lacks {', '.join(missing)}")
    opts: Any = options
    schema = getattr(obj, "Options", None)
    if schema is not None:
        from pydantic import ValidationError

        try:
            opts = schema.model_validate(options)
        except ValidationError as exc:
            lines = "; ".join(f"options.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
            raise WorkloadError(f"workload {ref!r}: {lines}") from None
    try:
        return obj(data_dir, opts, device)
    except Exception as exc:
        raise WorkloadError(f"workload {ref!r}: loading its data failed: {type(exc).__name__}: {exc}") from exc
