"""``python -m server_apps.experiments GRID [--out DIR] ...``: see :mod:`server_apps.experiments.cli`."""

from server_apps.experiments.cli import main

if __name__ == "__main__":  # the process pool's spawned workers import this module as __mp_main__
    raise SystemExit(main())
