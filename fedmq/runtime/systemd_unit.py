"""The agent's systemd unit: a notify-type, watchdog-supervised, hardened service.

``fedmq install-unit`` renders it for the config it is given: the interpreter
that runs fedmq now (a venv works), the config path, the user, and a writable
path for the config's ``state_dir`` (systemd's StateDirectory= when it lies under
/var/lib, else ReadWritePaths=). GPU servers keep device access; other profiles
get PrivateDevices=.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedmq.runtime.config import AgentConfig

STATE_ROOT = Path("/var/lib")


def render_unit(cfg: AgentConfig, config_path: Path, *, user: str = "fedmq", python: str | None = None,
                watchdog_s: int = 120) -> str:
    python = python or sys.executable
    config_path = config_path.resolve()
    state = Path(cfg.state_dir)
    if not state.is_absolute():
        raise ValueError(f"{config_path}: state_dir must be an absolute path for a service (got {state}); "
                         f"e.g. state_dir: {STATE_ROOT / 'fedmq' / cfg.agent_id} (systemd creates it as StateDirectory=)")
    lines_state = []
    if state.is_relative_to(STATE_ROOT):
        top = state.relative_to(STATE_ROOT).parts[0]
        lines_state += [f"StateDirectory={top}", "StateDirectoryMode=0700"]
    else:
        lines_state.append(f"ReadWritePaths={state}")
    gpu = cfg.profile in ("gpu-server", "auto") or cfg.train.device == "cuda"
    devices = [] if gpu else ["PrivateDevices=yes"]
    memory = [f"MemoryMax={int(cfg.memory_limit_mb * 1.5)}M"] if cfg.memory_limit_mb else []
    return "\n".join([
        "[Unit]",
        f"Description=fedmq federated-learning agent {cfg.agent_id}",
        "Documentation=file://" + str(Path(__file__).resolve().parents[2] / "README.md"),
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={python} -m fedmq agent --config {config_path}",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "RestartSec=5",
        f"WatchdogSec={watchdog_s}",
        "TimeoutStartSec=300",
        "TimeoutStopSec=30",
        f"User={user}",
        f"Group={user}",
        *lines_state,
        "UMask=0077",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        *devices,
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        "CapabilityBoundingSet=",
        *memory,
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])
