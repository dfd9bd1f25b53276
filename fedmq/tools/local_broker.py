"""A mosquitto of our own on a loopback port, with its own config and log.

Tests, field tests and the broker benchmark start one this way — never the system's mosquitto on 1883 —
so each run has a clean broker it can restart at will. With ``persistence`` the
broker keeps retained messages, subscriptions and queued QoS 1 messages across a
restart, as a production mosquitto does.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from fedmq.tools.local_cluster import wait_for_port


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if Path(p).exists()), None)


def resolve_kind(kind: str) -> str:
    """``auto`` is mosquitto where it is installed (the broker fleets run), else the embedded one."""
    if kind != "auto":
        return kind
    return "mosquitto" if mosquitto_binary() else "embedded"


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


def rabbitmq_binary() -> str | None:
    return shutil.which("rabbitmq-server") or next(
        (p for p in ("/usr/sbin/rabbitmq-server", "/usr/lib/rabbitmq/bin/rabbitmq-server") if Path(p).exists()), None)


@dataclass
class RabbitMQProcess:
    """A RabbitMQ node of our own (its own node name, ports, data and log dirs) with the
    ``rabbitmq_mqtt`` plugin on ``mqtt_port`` — never the system's node. Its MQTT
    plugin speaks 3.1.1, which is what every fedmq role speaks."""

    workdir: Path
    mqtt_port: int
    # Users and permissions (``fedmq broker provision --rabbitmq``): loaded at boot,
    # anonymous MQTT off. None: an open node, as for throughput runs.
    definitions: Path | None = None
    # A cluster's nodes share an Erlang cookie of their own (never the system node's).
    cookie: str | None = None
    extra_conf: str = ""  # more rabbitmq.conf lines (a cluster's queue type, partition handling)
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, timeout: float = 90.0) -> None:
        binary = rabbitmq_binary()
        if binary is None:
            raise FileNotFoundError("rabbitmq-server is not installed (Debian: apt-get install rabbitmq-server)")
        from fedmq.tools.local_cluster import free_port

        if os.geteuid() == 0:
            # The server script runs the node as the rabbitmq user, who must reach its
            # data dir: a pytest or home directory of root's would not do.
            import tempfile

            self.workdir = Path(tempfile.mkdtemp(prefix="fedmq-rabbitmq-"))
        w = self.workdir
        for sub in ("mnesia", "log"):
            (w / sub).mkdir(parents=True, exist_ok=True)
        (w / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        conf = (f"listeners.tcp.default = 127.0.0.1:{free_port()}\n"
                f"mqtt.listeners.tcp.default = 127.0.0.1:{self.mqtt_port}\nloopback_users = none\n")
        if self.definitions is not None:
            import shutil

            shutil.copyfile(self.definitions, w / "definitions.json")
            conf += f"mqtt.allow_anonymous = false\nload_definitions = {w / 'definitions.json'}\n"
        else:
            conf += "mqtt.allow_anonymous = true\n"
        (w / "rabbitmq.conf").write_text(conf + self.extra_conf)
        if os.geteuid() == 0:  # the server script drops to the rabbitmq user: let it write here
            import pwd

            ent = pwd.getpwnam("rabbitmq")
            for path in [w, *w.rglob("*")]:
                os.chown(path, ent.pw_uid, ent.pw_gid)
        self.node = f"fedmq{self.mqtt_port}@localhost"
        env = {**os.environ, "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_PORT": str(free_port()),
               "RABBITMQ_DIST_PORT": str(free_port()), "RABBITMQ_MNESIA_BASE": str(w / "mnesia"),
               "RABBITMQ_LOG_BASE": str(w / "log"), "RABBITMQ_CONFIG_FILE": str(w / "rabbitmq"),
               "RABBITMQ_ENABLED_PLUGINS_FILE": str(w / "enabled_plugins"), "RABBITMQ_PID_FILE": str(w / "pid"),
               "RABBITMQ_FEATURE_FLAGS_FILE": str(w / "feature_flags"),
               **({"RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": f"-setcookie {self.cookie}"} if self.cookie else {})}
        log = open(w / "server.log", "ab")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen([binary], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_for_port(self.mqtt_port, timeout=timeout)

    def ctl(self, *args: str, timeout: float = 120.0) -> str:
        """rabbitmqctl against this node (with the cluster's cookie); RuntimeError on failure."""
        ctl = shutil.which("rabbitmqctl", path="/usr/lib/rabbitmq/bin") or "rabbitmqctl"
        cookie = ["--erlang-cookie", self.cookie] if self.cookie else []
        home = self.workdir / "clihome"
        home.mkdir(exist_ok=True)
        done = subprocess.run([ctl, *cookie, "-n", self.node, *args], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "HOME": str(home)})
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {self.node}: {done.stdout}{done.stderr}".strip())
        return done.stdout

    def wait_booted(self, timeout: float = 120.0) -> None:
        """await_startup fails at once until the node has registered with epmd: retried."""
        import time

        end = time.monotonic() + timeout
        while True:
            try:
                self.ctl("await_startup", "--timeout", "30", timeout=60)
                return
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > end:
                    raise
                time.sleep(0.5)

    def kill(self) -> None:
        """SIGKILL the node: the Erlang VM and everything under it, as a machine that dies."""
        import psutil

        try:
            tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except (psutil.NoSuchProcess, AttributeError):
            return
        for p in reversed(tree):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(10)

    def stop(self) -> None:
        """The whole tree: the server script hands the node to the rabbitmq user (su),
        so the Erlang VM is a descendant, not the process we started."""
        if self.proc is None or self.proc.poll() is not None:
            return
        import psutil

        try:
            tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for p in reversed(tree):
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=30)
        for p in alive:
            p.kill()
        self.proc.wait(10)
