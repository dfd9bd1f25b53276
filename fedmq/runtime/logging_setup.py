"""One log format for every role, so the demo's interleaved logs stay readable."""

from __future__ import annotations

import logging


def configure(role: str, level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format=f"%(asctime)s %(levelname)-7s {role:<12} %(message)s")
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
