"""systemd's notify protocol, spoken directly (no dependency): one datagram per
state change to the AF_UNIX socket named by ``$NOTIFY_SOCKET``.

Why not a library: the protocol is a single ``sendto`` of ``KEY=VALUE`` lines; the
only subtleties are abstract-namespace addresses (a leading ``@``) and staying
silent when not started by systemd, both handled here. ``Type=notify`` units
become active on ``READY=1``; with ``WatchdogSec=`` the service must send
``WATCHDOG=1`` more often than ``$WATCHDOG_USEC`` or systemd restarts it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._sock: socket.socket | None = None
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: str | int) -> bool:
        """Send e.g. ``notify(READY=1, STATUS="waiting for rounds")``; False if not under systemd."""
        if not self._sock:
            return False
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace
        msg = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            self._sock.sendto(msg, addr)
            return True
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address, exc)
            return False

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.notify(STATUS=status)

    def stopping(self) -> bool:
        return self.notify(STOPPING=1, STATUS="stopping")

    def reloading(self) -> bool:
        return self.notify(RELOADING=1, STATUS="reloading configuration")

    @staticmethod
    def watchdog_interval_s() -> float | None:
        """Half the watchdog period systemd asked for, or None if there is no watchdog."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 1e6 / 2
        except ValueError:
            return None

    def start_watchdog(self, alive, stop: threading.Event) -> threading.Thread | None:
        """Ping ``WATCHDOG=1`` while ``alive()`` holds — a wedged main loop stops the pings,
        and systemd restarts the service."""
        interval = self.watchdog_interval_s()
        if not self.enabled or interval is None:
            return None

        def loop() -> None:
            while not stop.wait(interval):
                if alive():
                    self.notify(WATCHDOG=1)
                else:
                    log.error("main loop unresponsive; withholding the watchdog ping")
        t = threading.Thread(target=loop, name="sd-watchdog", daemon=True)
        t.start()
        return t
