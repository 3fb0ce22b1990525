"""Processes started and stopped by pid: finding descendants, telling a reused pid from the
process we saw, and the one stop loop (SIGTERM, wait, SIGKILL what is left) that the
deployment (:mod:`deploy.local`) and ``flwr run``'s local SuperLink
(:mod:`clair_flower.server_apps.local_superlink`) share.

Nothing here finds a process by name: every pid is one we started or a descendant of one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    try:
        import psutil

        for p in psutil.process_iter(["pid", "ppid"]):
            kids.setdefault(p.info["ppid"], []).append(p.info["pid"])
        return kids
    except ImportError:
        pass
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...)."""
    kids, out, todo = children_map(), [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def start_time(pid: int) -> str | None:
    """Kernel start time of ``pid`` (tells a reused pid from the process we saw)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie counts as gone
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except (OSError, IndexError):
        return True


def signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def wait_gone(pids: Iterable[int], grace: float, alive: Callable[[int], bool] = is_alive) -> list[int]:
    """Wait up to ``grace`` seconds for every pid to be gone; return those still alive."""
    pids = list(pids)
    deadline = time.time() + grace
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


def stop_pids(pids: Iterable[int], grace: float = 10.0, alive: Callable[[int], bool] = is_alive) -> None:
    """SIGTERM, then SIGKILL whatever is still alive after ``grace`` seconds."""
    pids = list(pids)
    signal_pids(pids, signal.SIGTERM)
    signal_pids(wait_gone(pids, grace, alive), signal.SIGKILL)


@dataclass
class Started:
    name: str
    proc: subprocess.Popen
    log: Path


def become_subreaper() -> bool:
    """Linux: orphaned descendants (the detached SuperExec processes) re-parent to this process
    instead of init, so ``ProcessGroup.stop`` can reap them rather than leave zombies."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


class ProcessGroup:
    """Processes started here; ``stop()`` ends them and their descendants by pid."""

    def __init__(self) -> None:
        become_subreaper()
        self.started: list[Started] = []
        self._known: dict[int, str | None] = {}

    def start(self, name: str, cmd: Sequence[str], env: Mapping[str, str], log: Path,
              cwd: Path | None = None) -> Started:
        log.parent.mkdir(parents=True, exist_ok=True)
        fh = log.open("ab")
        proc = subprocess.Popen(list(cmd), env=dict(env), cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        fh.close()
        s = Started(name, proc, log)
        self.started.append(s)
        self._known[proc.pid] = start_time(proc.pid)
        return s

    def snapshot(self) -> None:
        """Remember the current descendants (SuperExec, flwr-serverapp/clientapp run detached)."""
        for s in self.started:
            if s.proc.poll() is None:
                for pid in descendants(s.proc.pid):
                    self._known.setdefault(pid, start_time(pid))

    def _is_ours(self, pid: int) -> bool:
        """A known pid still alive and still the same process (not a reused pid)."""
        return is_alive(pid) and start_time(pid) == self._known[pid]

    def _still_ours(self) -> list[int]:
        return [p for p in self._known if self._is_ours(p)]

    def check_alive(self) -> None:
        for s in self.started:
            if s.proc.poll() is not None:
                raise RuntimeError(f"{s.name} (pid {s.proc.pid}) exited with {s.proc.returncode}; "
                                   f"log {s.log}:\n{tail(s.log)}")

    def stop(self, grace: float = 10.0) -> None:
        self.snapshot()
        # SuperNodes (and flwr run) before the SuperLink
        roots = [s.proc.pid for s in reversed(self.started) if s.proc.poll() is None]
        signal_pids(roots, signal.SIGTERM)
        deadline = time.time() + grace
        for s in self.started:
            try:
                s.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        # then the descendants; after 3 s, SIGKILL to whatever of ours (roots too) is left
        signal_pids([p for p in self._still_ours() if p not in roots], signal.SIGTERM)
        signal_pids(wait_gone(list(self._known), 3.0, self._is_ours), signal.SIGKILL)
        for s in self.started:
            try:
                s.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        ours = {s.proc.pid for s in self.started}
        for pid in self._known:  # descendants re-parented to us: reap them (only those pids)
            if pid not in ours:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass


def tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "<no log>"
