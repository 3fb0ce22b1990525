"""One install namespace (docs/DESIGN.md section 2): pyproject's mapping matches the folders,
and every import in the code base names ``clair_flower.strategies`` (never bare ``strategies``).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import clair_flower

ROOT = Path(__file__).resolve().parents[2]
BARE = set(clair_flower.APP_PACKAGES)


def setuptools_table() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_package_dir_maps_exactly_the_app_folders() -> None:
    assert setuptools_table()["package-dir"] == {f"clair_flower.{name}": name for name in BARE}


def test_packages_list_every_package_folder() -> None:
    found = set()
    for top in ("clair_flower", *BARE):
        for init in (ROOT / top).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT).parts
            found.add(".".join(parts if top == "clair_flower" else ("clair_flower", *parts)))
    assert set(setuptools_table()["packages"]) == found


def test_flwr_components_use_the_namespace() -> None:
    components = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    assert all(ref.startswith("clair_flower.") for ref in components.values())


def test_no_import_uses_a_bare_app_package_name() -> None:
    offenders = []
    for folder in ("clair_flower", *BARE, "tests", "deploy", "benchmarks", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                         else [])
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                              if n.split(".")[0] in BARE]
    assert offenders == []


def test_source_tree_resolves_the_namespace_to_the_sibling_folders() -> None:
    import clair_flower.client_apps
    import clair_flower.server_apps
    import clair_flower.strategies

    for name in BARE:
        module = getattr(clair_flower, name)
        assert Path(module.__file__).resolve() == (ROOT / name / "__init__.py").resolve()
