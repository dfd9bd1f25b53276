"""A mosquitto of our own on a loopback port, with its own config and log.

Tests and field tests start one this way — never the system's mosquitto on 1883 —
so each run has a clean broker it can restart at will. With ``persistence`` the
broker keeps retained messages, subscriptions and queued QoS 1 messages across a
restart, as a production mosquitto does.
"""

from __future__ import annotations

import getpass
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from fedmq.local_cluster import wait_for_port


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if Path(p).exists()), None)


@dataclass
class MosquittoProcess:
    workdir: Path
    port: int
    persistence: bool = True
    max_packet_size: int = 2 * 1024 * 1024
    extra_conf: str = ""
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def conf_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Run as whoever starts us: as root, mosquitto would otherwise switch to the
        # 'mosquitto' user, which cannot write the persistence file in our work dir.
        lines = [f"user {getpass.getuser()}", f"listener {self.port} 127.0.0.1", "allow_anonymous true",
                 f"max_packet_size {self.max_packet_size}",
                 # Queued QoS 1 messages for persistent sessions that are briefly away:
                 # an aggregator restart must not lose the chunks sent meanwhile.
                 "max_queued_messages 100000", "log_dest stdout", "log_type error", "log_type warning",
                 "log_type notice", "log_type information"]
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.workdir}/", "autosave_interval 1"]
        else:
            lines.append("persistence false")
        self.conf_path.write_text("\n".join(lines) + "\n" + self.extra_conf)

    def start(self) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise FileNotFoundError("mosquitto is not installed (Debian: apt-get install mosquitto)")
        if not self.conf_path.exists():
            self.write_config()
        log = open(self.workdir / "mosquitto.log", "ab")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen([binary, "-c", str(self.conf_path)], stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, timeout=15)

    def stop(self) -> None:
        """SIGTERM: mosquitto writes its persistence file on the way out."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
