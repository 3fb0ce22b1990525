"""clair-flower's Flower-free core.

- :mod:`clair_flower.lora`: LoRA factors (``dW = scaling * B @ A``), shared by every layer.
- :mod:`clair_flower.clair`: the CLAIR method.
- :mod:`clair_flower.copytask`: the copy-task simulation (task, model, training, attacks).

Nothing in this folder imports Flower; :mod:`clair_flower.strategies`,
:mod:`clair_flower.client_apps` and :mod:`clair_flower.server_apps` build on it.

One install namespace (docs/DESIGN.md section 2): those three live in the repository's top-level
folders ``strategies/``, ``client_apps/`` and ``server_apps/``. The wheel maps them into this
package (setuptools ``package-dir`` in pyproject.toml), so an installed copy has
``clair_flower/strategies/`` and needs nothing from here. In a source tree (tests, ``flwr run .``
with the project directory on ``sys.path``, a FAB unpacked by Flower) the folders sit next to this
one instead; the finder below resolves exactly those three names to them, and nothing else.
Importing this package imports none of them (so no Flower) until they are asked for.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

#: The subpackages mapped from sibling folders; pyproject.toml's ``package-dir`` lists the same.
APP_PACKAGES = ("strategies", "client_apps", "server_apps")


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    """``clair_flower.<app>`` -> ``<tree>/<app>/`` when ``<tree>/clair_flower/<app>`` is absent."""

    def find_spec(self, fullname, path, target=None):  # noqa: D102
        parent, _, name = fullname.rpartition(".")
        if parent != __name__ or name not in APP_PACKAGES or not path:
            return None
        for entry in path:  # the parent's __path__: the folder this package was loaded from
            if (Path(entry) / name).exists():  # an installed copy: the regular import finds it
                return None
            init = Path(entry).parent / name / "__init__.py"
            if init.is_file():
                return importlib.util.spec_from_file_location(
                    fullname, init, submodule_search_locations=[str(init.parent)])
        return None


def _install_source_tree_finder() -> None:
    here = Path(__file__).resolve().parent
    if (here / APP_PACKAGES[0]).exists() or not (here.parent / APP_PACKAGES[0] / "__init__.py").is_file():
        return  # installed from a wheel (or no source tree around): nothing to map
    # Stateless, so one instance serves every copy of this package (Flower may re-import it from
    # an unpacked FAB); first in line so a stale editable-install mapping never answers instead.
    if not any(type(f).__name__ == _SourceTreeFinder.__name__ for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceTreeFinder())


_install_source_tree_finder()
