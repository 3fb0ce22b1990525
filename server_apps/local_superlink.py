"""Find and stop the background SuperLink that ``flwr run`` starts for local simulations.

``flwr run .`` leaves a SuperLink running after the run. It is found by the ``FLWR_HOME``
in its environment (each run of ours uses its own), and stopped by pid, never by name, so
other Flower processes on the machine are left alone.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


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


def stop_pids(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL whatever is still alive after ``grace`` seconds."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    for pid in pids:
        while time.time() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
