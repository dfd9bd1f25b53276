"""Writing the scaffold: a package with the workload and its entry point, a README,
and the configs of every role for it (the same ones a fleet would start from)."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from fedmq.runtime import config as cfgmod
from fedmq.runtime.private_files import write_private

_HERE = Path(__file__).parent
NAME = re.compile(r"^[a-z][a-z0-9_-]{0,40}$")


def scaffold(name: str, out: Path) -> Path:
    """Write ``out/name``; refuses to overwrite. Returns the project directory."""
    if not NAME.match(name):
        raise ValueError(f"{name!r}: use lower-case letters, digits, '-' or '_', starting with a letter")
    root = Path(out) / name
    if root.exists():
        raise FileExistsError(f"{root} exists; choose another name or directory")
    package = name.replace("-", "_")
    fill = {"name": name, "package": package}
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text(f'"""{name}: a fedmq workload."""\n')
    for tmpl, target in (("workload.py.tmpl", root / package / "workload.py"),
                         ("pyproject.toml.tmpl", root / "pyproject.toml"), ("README.md.tmpl", root / "README.md")):
        target.write_text((_HERE / tmpl).read_text().format(**fill))
    _configs(root / "configs", name)
    return root


def _configs(d: Path, name: str) -> None:
    agents = ["agent-1", "agent-2"]
    creds = {a: secrets.token_urlsafe(24) for a in agents}
    configs = {
        "keyauthority": cfgmod.KeyAuthorityConfig(task=name.replace("_", "-"), credentials=creds,
                                                  aggregator_key="state/aggregator/signing.pub"),
        "aggregator": cfgmod.AggregatorConfig(task=name.replace("_", "-"), authority_key="state/keyauthority/signing.pub",
                                              target_agents=2),
    }
    for a in agents:
        configs[a] = cfgmod.AgentConfig(agent_id=a, credential=creds[a], task=name.replace("_", "-"),
                                        state_dir=Path("state") / a, authority_key="state/keyauthority/signing.pub",
                                        workload=cfgmod.WorkloadSettings(name=name, data_dir=Path("data") / a))
        (d.parent / "data" / a).mkdir(parents=True, exist_ok=True)
    for role, cfg in configs.items():
        write_private(d / f"{role}.yaml", cfgmod.dump(cfg).encode())
