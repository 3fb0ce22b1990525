"""Imports point one way: apps -> strategies -> clair_flower; inside the core, the method and the
simulation never import each other (that the core never imports Flower is
``tests/clair_flower/test_flower_free.py``).

One exception, by design: the ClientApp reads the run config's schema, which the ServerApp owns
(``server_apps/run_config.py``; docs/DESIGN.md section 2).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"server_apps.run_config", "clair_flower.server_apps.run_config"}


def _imports(folder: str) -> dict[str, set[str]]:
    """Every absolute module name imported by each file under ``folder``."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        out[str(path.relative_to(ROOT))] = names
    return out


def _top(name: str) -> str:
    """The layer an import names, whether written ``strategies.x`` or ``clair_flower.strategies.x``."""
    parts = name.split(".")
    if parts[0] == "clair_flower" and len(parts) > 1 and parts[1] in ("strategies", "server_apps", "client_apps"):
        return parts[1]
    if parts[:2] in (["clair_flower", "clair"], ["clair_flower", "copytask"]):
        return ".".join(parts[:2])
    return parts[0]


@pytest.mark.parametrize(("folder", "forbidden"), [
    ("clair_flower/clair", {"clair_flower.copytask"}),
    ("clair_flower/copytask", {"clair_flower.clair"}),
    ("strategies", {"server_apps", "client_apps", "deploy"}),
    ("client_apps", {"server_apps", "deploy"}),
])
def test_imports_point_one_way(folder: str, forbidden: set[str]) -> None:
    bad = {f: sorted(n for n in names if _top(n) in forbidden and n not in ALLOWED)
           for f, names in _imports(folder).items()}
    assert not {f: n for f, n in bad.items() if n}, f"{folder} imports a layer above it"
