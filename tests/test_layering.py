"""Roles depend on the shared core, never on each other; the core imports no role
(the CLI, the composition root, imports roles lazily inside its commands)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROLES = {"agent", "aggregator", "keyauthority", "broker"}


def _imports(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module.split(".")[0])
    return mods


def _top_level_imports(path: Path) -> set[str]:
    mods = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module.split(".")[0])
    return mods


def test_roles_do_not_import_each_other():
    for role in ROLES:
        for f in (ROOT / role).rglob("*.py"):
            bad = _imports(f) & (ROLES - {role})
            assert not bad, f"{f.relative_to(ROOT)} imports role(s) {bad}"


def test_core_imports_no_role_at_module_level():
    for f in (ROOT / "fedmq").rglob("*.py"):
        mods = _top_level_imports(f) if f.name == "cli.py" else _imports(f)
        assert not mods & ROLES, f"{f.relative_to(ROOT)} imports role(s) {mods & ROLES}"


def test_aggregator_never_needs_torch():
    for f in list((ROOT / "aggregator").rglob("*.py")) + list((ROOT / "keyauthority").rglob("*.py")):
        assert "torch" not in _imports(f), f"{f.relative_to(ROOT)} imports torch"
