"""The built wheel installs one top-level name, ``clair_flower`` (docs/DESIGN.md section 2).

Slow: builds the wheel from a copy of the source tree with pip, installs it with
``pip install --no-deps --target``, and imports it from a Flower project that has its own
``strategies`` package. The other dependencies come from the running interpreter's environment.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIP = shutil.ignore_patterns(".git", ".venv", ".cache", "outputs", "build", "dist", "*.egg-info",
                              "__pycache__", ".pytest_cache")

CHECK = r"""
import json, sys
from pathlib import Path
import strategies
from clair_flower.strategies import ClairStrategy, ClairRoLoRA, FFALoRA, LocalOnly, RoLoRA
from clair_flower.strategies.clair import ClairStrategy as Direct
from clair_flower.server_apps.copy_server import app as server_app
from clair_flower.client_apps.copy_client import app as client_app
import clair_flower, clair_flower.strategies
assert Direct is ClairStrategy
print(json.dumps({
    "project_strategies": strategies.__file__, "project_marker": strategies.MARKER,
    "clair_flower": clair_flower.__file__, "clair_strategies": clair_flower.strategies.__file__,
    "server_app": type(server_app).__name__, "client_app": type(client_app).__name__,
    "exported": sorted(c.__module__ for c in (ClairStrategy, ClairRoLoRA, FFALoRA, LocalOnly, RoLoRA)),
    "bare": sorted(m for m in sys.modules if m.split(".")[0] in ("server_apps", "client_apps")),
}))
"""


def setuptools_major() -> int:
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return 0


def pip(*args: str, cwd: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=540)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.slow
def test_wheel_installs_one_namespace_beside_a_projects_own_strategies(tmp_path: Path) -> None:
    src, wheels, site, project = (tmp_path / n for n in ("src", "wheels", "site", "project"))
    shutil.copytree(ROOT, src, ignore=SKIP)
    # Offline-friendly: build with the environment's setuptools when it is new enough.
    isolation = ["--no-build-isolation"] if setuptools_major() >= 68 else []
    pip("wheel", "--no-deps", *isolation, "-w", str(wheels), str(src), cwd=tmp_path)
    (wheel,) = wheels.glob("clair_flower-*.whl")
    pip("install", "--no-deps", "--target", str(site), str(wheel), cwd=tmp_path)

    top = {p.name for p in site.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin"}
    assert top == {"clair_flower"}
    for name in ("strategies", "client_apps", "server_apps"):
        assert not (site / name).exists()
        assert (site / "clair_flower" / name / "__init__.py").is_file()

    (project / "strategies").mkdir(parents=True)
    (project / "strategies" / "__init__.py").write_text('MARKER = "the project\'s own"\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(project)]))
    res = subprocess.run([sys.executable, "-c", CHECK], cwd=project, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    assert Path(seen["project_strategies"]).resolve() == (project / "strategies" / "__init__.py").resolve()
    assert seen["project_marker"] == "the project's own"
    assert Path(seen["clair_flower"]).resolve().is_relative_to(site.resolve())
    assert Path(seen["clair_strategies"]).resolve() == (site / "clair_flower" / "strategies" / "__init__.py").resolve()
    assert seen["server_app"] == "ServerApp" and seen["client_app"] == "ClientApp"
    assert all(m.startswith("clair_flower.strategies.") for m in seen["exported"])
    assert seen["bare"] == []
