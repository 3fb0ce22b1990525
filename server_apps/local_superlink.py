"""Find and stop the background SuperLink that ``flwr run`` starts for local simulations.

``flwr run .`` leaves a SuperLink running after the run. It is found by the ``FLWR_HOME``
in its environment (each run of ours uses its own), and stopped by pid, never by name, so
other Flower processes on the machine are left alone (:func:`clair_flower.server_apps.processes.stop_pids`:
SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import os
from pathlib import Path

from clair_flower.server_apps.processes import stop_pids

__all__ = ["stop_pids", "superlink_pids"]


def superlink_pids(flwr_home: str | os.PathLike) -> list[int]:
    """Pids of ``flower-superlink`` processes whose environment has this ``FLWR_HOME``."""
    want = f"FLWR_HOME={Path(flwr_home)}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            if b"flower-superlink" not in cmd:
                continue
            if want in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids
