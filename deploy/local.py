"""A whole federation on loopback: a SuperLink and N SuperNodes on free ports, started,
checked and stopped by pid (:class:`clair_flower.server_apps.processes.ProcessGroup`), and ``flwr run``."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from deploy.config import (CONNECTION, REPO_ROOT, FederationSpec, flower_bin, flower_env, run_config_string,
                           write_flwr_config)
from deploy.tls import generate_node_keys, generate_tls
from clair_flower.server_apps.processes import ProcessGroup, signal_pids, tail


def free_port(host: str = "127.0.0.1", avoid: Iterable[int] = (39091, 39092, 39093, 8000, 9094)) -> int:
    """A TCP port nobody listens on now (not one of Flower's defaults)."""
    avoid = set(avoid)
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port
    raise RuntimeError("no free port found")


def wait_port(host: str, port: int, timeout: float) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


@dataclass
class RunResult:
    returncode: int
    run_id: int | None
    status: str | None
    seconds: float
    log: Path


class LocalFederation:
    """SuperLink + N SuperNodes on loopback in ``workdir``; use as a context manager."""

    def __init__(self, workdir: Path, num_supernodes: int = 3, contaminated: Iterable[int] = (),
                 tls: bool = False, auth: bool = False, extra_env: Mapping[str, str] | None = None,
                 app_dir: Path = REPO_ROOT) -> None:
        if auth and not tls:
            raise ValueError("SuperNode authentication needs TLS (flower-superlink refuses "
                             "--enable-supernode-auth with --insecure)")
        self.workdir = Path(workdir).resolve()
        self.app_dir = Path(app_dir).resolve()
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.env = flower_env(self.flwr_home, extra_env)
        port = free_port()
        self.spec = FederationSpec(num_supernodes=num_supernodes, contaminated=frozenset(contaminated),
                                   address=f"127.0.0.1:{port}")
        if tls:
            self.spec.tls = generate_tls(self.workdir / "certs")
        if auth:
            self.spec.node_keys = generate_node_keys(self.workdir / "keys", num_supernodes)
        ports: list[int] = []
        while len(ports) < num_supernodes:
            p = free_port()
            if p != port and p not in ports:
                ports.append(p)
        self.spec.supernode_ports = ports
        self.procs = ProcessGroup()

    # lifecycle
    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def flwr(self, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
        """Run a ``flwr`` CLI command against this federation's FLWR_HOME."""
        res = subprocess.run([flower_bin("flwr"), *args], env=self.env, cwd=self.app_dir, capture_output=True,
                             text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def start(self, timeout: float = 60.0) -> None:
        write_flwr_config(self.flwr_home, self.spec.address,
                          self.spec.tls.ca_cert if self.spec.tls else None)
        self.procs.start("superlink", self.spec.superlink_cmd(), self.env, self.logs / "superlink.log",
                         cwd=self.workdir)
        try:
            wait_port("127.0.0.1", self.spec.port, timeout)
        except TimeoutError:
            self.procs.check_alive()
            raise
        if self.spec.auth:
            for i in range(self.spec.num_supernodes):
                self._retry(lambda i=i: self.flwr(*self.spec.register_cmd(i)[1:]), timeout=30)
        for i in range(self.spec.num_supernodes):
            self.procs.start(f"supernode-{i}", self.spec.supernode_cmd(i), self.env,
                             self.logs / f"supernode-{i}.log", cwd=self.workdir)
        self.wait_for_nodes(timeout)
        self.procs.snapshot()

    @staticmethod
    def _retry(fn, timeout: float):  # noqa: ANN001, ANN205
        t0 = time.time()
        while True:
            try:
                return fn()
            except RuntimeError:
                if time.time() - t0 > timeout:
                    raise
                time.sleep(1.0)

    def online_nodes(self) -> int:
        res = self.flwr("supernode", "list", CONNECTION, "--format", "json", check=False)
        try:
            nodes = json.loads(res.stdout).get("nodes", [])
        except (json.JSONDecodeError, AttributeError):
            return 0
        return sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")

    def wait_for_nodes(self, timeout: float = 60.0) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            self.procs.check_alive()
            if self.online_nodes() >= self.spec.num_supernodes:
                return
            time.sleep(1.0)
        raise TimeoutError(f"fewer than {self.spec.num_supernodes} SuperNodes online after {timeout:.0f}s; "
                           f"superlink log:\n{tail(self.logs / 'superlink.log')}")

    def stop(self) -> None:
        self.procs.stop()

    # runs
    def run_app(self, run_config: str | Mapping[str, object] = "", timeout: float = 300.0,
                done: Path | None = None) -> RunResult:
        """``flwr run APP CONNECTION --stream``; returns when the run is finished.

        If the stream does not end by itself, polls ``flwr list`` (and the ``done`` file, e.g.
        the run's summary.json) and stops the stream once the run is finished.
        """
        rc_str = run_config if isinstance(run_config, str) else run_config_string(run_config)
        cmd = [flower_bin("flwr"), "run", str(self.app_dir), CONNECTION, "--stream"]
        if rc_str:
            cmd += ["--run-config", rc_str]
        log = self.logs / f"flwr-run-{int(time.time())}.log"
        t0 = time.time()
        stream = self.procs.start("flwr-run", cmd, self.env, log, cwd=self.app_dir)
        run_id = status = None
        last_poll = 0.0
        try:
            while time.time() - t0 < timeout:
                if stream.proc.poll() is not None:
                    break
                self.procs.snapshot()
                if run_id is None:
                    run_id = run_id_from_log(log)
                if done is not None and done.exists():
                    status = self.run_status(run_id)
                    if status is None or status.startswith("finished"):
                        time.sleep(1.0)
                        break
                elif run_id is not None and time.time() - last_poll > 5.0:
                    last_poll = time.time()
                    status = self.run_status(run_id)
                    if status and status.startswith("finished"):
                        break
                time.sleep(1.0)
            else:
                raise TimeoutError(f"run not finished after {timeout:.0f}s; log:\n{tail(log)}")
        finally:
            if stream.proc.poll() is None:
                signal_pids([stream.proc.pid], signal.SIGINT)
                try:
                    stream.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    stream.proc.kill()
                    stream.proc.wait()
        if run_id is None:
            run_id = run_id_from_log(log)
        status = self.run_status(run_id) or status
        return RunResult(stream.proc.returncode, run_id, status, time.time() - t0, log)

    def run_status(self, run_id: int | None) -> str | None:
        """``finished:completed``, ``running``... of a run (``flwr list --run-id``)."""
        if run_id is None:
            return None
        res = self.flwr("list", CONNECTION, "--run-id", str(run_id), "--format", "json", check=False)
        try:
            runs = json.loads(res.stdout).get("runs", [])
        except (json.JSONDecodeError, AttributeError):
            return None
        return str(runs[0].get("status")) if runs else None


def run_id_from_log(log: Path) -> int | None:
    try:
        m = re.search(r"run (?:ID )?(\d{3,})", log.read_text(errors="replace"), re.IGNORECASE)
    except OSError:
        return None
    return int(m.group(1)) if m else None
