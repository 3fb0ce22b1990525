"""``python -m clair_flower.server_apps.experiments GRID [--out DIR] ...``: see :mod:`clair_flower.server_apps.experiments.cli`."""

from clair_flower.server_apps.experiments.cli import main

if __name__ == "__main__":  # the process pool's spawned workers import this module as __mp_main__
    raise SystemExit(main())
