"""What the aggregator can read of one agent's update under a protection mode.

The aggregator knows which coordinates are encrypted (it adds the plain part
itself), so the attacker to measure against is *drop-aware*: it inverts only what
it can read (``fedmq audit``). A mode passes when that is nothing of any single
agent: everything encrypted, or everything readable masked (secure_aggregation.py).
"""

from __future__ import annotations

import logging

from fedmq.protocol.messages import Protection


def _fully_encrypted(prot: Protection) -> bool:
    return prot.p >= 1.0 and prot.scheme != "quantize"  # quantize encrypts nothing, whatever p says


def exposed_part(prot: Protection) -> str | None:
    """None when no single update is readable by the aggregator; else what it reads."""
    if prot.secure_masking or _fully_encrypted(prot):
        return None
    if prot.scheme == "ckks":
        return f"the unencrypted {1 - prot.p:.0%} of every update as floats"
    if prot.scheme == "quantize":
        return "every update's integer codes (the plan is secret, but codes are an affine image of the update)"
    return f"the unencrypted {1 - prot.p:.0%} of every update's codes"


def aggregator_view(prot: Protection) -> str:
    """One line for docs, logs and the audit table."""
    exposed = exposed_part(prot)
    if exposed is not None:
        return f"one agent's update: {exposed}"
    if prot.secure_masking and not _fully_encrypted(prot):
        return "ciphertexts and masked integers: only the round's sum of the readable part"
    return "ciphertexts only"


def start_warning(prot: Protection) -> str | None:
    """The warning a role logs at start for a mode that fails the drop-aware audit."""
    exposed = exposed_part(prot)
    notes = []
    if exposed is not None:
        mode = prot.scheme if prot.scheme == "quantize" else f"{prot.scheme} p={prot.p:g}"
        notes.append(f"protection {mode} without secure_masking lets the aggregator read "
                     f"{exposed}: it fails the drop-aware audit (fedmq audit); set secure_masking: true")
    if prot.dp is not None and exposed is not None:
        notes.append("differential privacy noise is shared among the agents: one update's share alone protects "
                     "little unless updates are masked or encrypted")
    return "; ".join(notes) or None


def log_start_warning(logger: logging.Logger, prot: Protection, prefix: str = "") -> None:
    """Every role (key authority, aggregator, each agent) says it at start."""
    warning = start_warning(prot)
    if warning:
        logger.warning("%s%s", prefix, warning)
