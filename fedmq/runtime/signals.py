"""Clean shutdown for the daemons: SIGTERM (systemd's stop) and SIGINT set one event
that each role's main loop watches, so it can say goodbye and persist its state."""

from __future__ import annotations

import signal
import threading


def stop_event() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def reload_event() -> threading.Event:
    """SIGHUP (``systemctl reload``) sets this; the daemon re-reads its config."""
    reload = threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    return reload
