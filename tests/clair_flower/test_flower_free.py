"""The core folder ``clair_flower/`` never imports Flower, directly or through the app packages.

The installed namespace ``clair_flower.strategies`` / ``.client_apps`` / ``.server_apps`` may (those
are the sibling folders mapped into it, docs/DESIGN.md section 2); the files in this folder may not.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import clair_flower

CORE = Path(__file__).resolve().parents[2] / "clair_flower"
FORBIDDEN = ("flwr",) + tuple(f"clair_flower.{name}" for name in clair_flower.APP_PACKAGES)


def imported_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_module_in_the_core_folder_imports_flower_or_the_apps() -> None:
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 10
    offenders = {str(f.relative_to(CORE)): sorted(n for n in imported_names(f)
                                                  if any(n == p or n.startswith(p + ".") for p in FORBIDDEN))
                 for f in files}
    assert {f: names for f, names in offenders.items() if names} == {}


def test_importing_the_core_package_loads_no_flower() -> None:
    code = ("import sys, clair_flower, clair_flower.lora; "
            "assert not [m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')], 'flwr imported'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
