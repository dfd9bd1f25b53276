"""The three layers, enforced on the source:

* the core (``fedmq`` minus ``fedmq.tools``) imports no role and no tool;
* the roles import the core, never each other and never a tool;
* the tools may import everything (the CLI imports each role lazily, inside its command).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROLES = {"agent", "aggregator", "keyauthority", "broker"}
CORE_GROUPS = {"protocol", "privacy", "learning", "runtime"}


def _imports(path: Path) -> set[str]:
    """Every absolute module imported anywhere in the file (lazy imports included), dotted."""
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module)
            mods |= {f"{node.module}.{a.name}" for a in node.names}
    return mods


def _tops(mods: set[str]) -> set[str]:
    return {m.split(".")[0] for m in mods}


def _uses_tools(mods: set[str]) -> bool:
    return any(m == "fedmq.tools" or m.startswith("fedmq.tools.") for m in mods)


def _core_files():
    for f in (ROOT / "fedmq").rglob("*.py"):
        if "tools" not in f.relative_to(ROOT / "fedmq").parts and f.name != "__main__.py":  # ``python -m fedmq`` is the CLI
            yield f


def test_core_is_grouped_by_idea():
    loose = sorted(f.name for f in (ROOT / "fedmq").glob("*.py") if f.name not in {"__init__.py", "__main__.py"})
    assert not loose, f"modules outside a group: {loose}"
    groups = {d.name for d in (ROOT / "fedmq").iterdir() if d.is_dir() and (d / "__init__.py").exists()}
    assert groups == CORE_GROUPS | {"tools"}
    for g in groups:
        doc = ast.get_docstring(ast.parse((ROOT / "fedmq" / g / "__init__.py").read_text()))
        assert doc and len(doc) > 80, f"fedmq/{g}/__init__.py needs a paragraph saying what the group holds"


def test_core_imports_no_role_and_no_tool():
    for f in _core_files():
        mods = _imports(f)
        assert not _tops(mods) & ROLES, f"{f.relative_to(ROOT)} imports role(s) {_tops(mods) & ROLES}"
        assert not _uses_tools(mods), f"{f.relative_to(ROOT)} imports a tool"


def test_roles_import_neither_each_other_nor_tools():
    for role in ROLES:
        for f in (ROOT / role).rglob("*.py"):
            mods = _imports(f)
            bad = _tops(mods) & (ROLES - {role})
            assert not bad, f"{f.relative_to(ROOT)} imports role(s) {bad}"
            assert not _uses_tools(mods), f"{f.relative_to(ROOT)} imports a tool"


def test_tools_import_roles_only_lazily():
    """Importing the CLI must not import every role (and torch with the agent)."""
    for f in (ROOT / "fedmq" / "tools").rglob("*.py"):
        top = set()
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.Import):
                top |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                top.add(node.module.split(".")[0])
        if f.name == "cli.py":
            assert not top & ROLES, f"{f.relative_to(ROOT)} imports role(s) {top & ROLES} at module level"


def test_aggregator_never_needs_torch():
    for f in list((ROOT / "aggregator").rglob("*.py")) + list((ROOT / "keyauthority").rglob("*.py")):
        assert "torch" not in _tops(_imports(f)), f"{f.relative_to(ROOT)} imports torch"
