"""Real Flower deployment of clair-flower: one SuperLink, N SuperNodes, ``flwr run``.

Checked against flwr 1.41 (``flower-superlink``/``flower-supernode``/``flwr`` CLIs):

* The SuperLink serves Fleet, Control and Runtime APIs over HTTP(S) on one port
  (``--host``/``--port``, default 127.0.0.1:8000).
* Every SuperNode gets ``--node-config "partition-id=i num-partitions=N"`` (nothing injects it
  outside simulation) and, for a contaminated client, ``contaminated=true``; on one host each
  SuperNode needs its own Runtime API ``--port``.
* TLS: SuperLink ``--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile``; SuperNodes and the ``flwr``
  CLI trust the CA with ``--root-certificates`` / ``root-certificates = ...`` in config.toml.
* SuperNode authentication (needs TLS): SuperLink ``--enable-supernode-auth``; each SuperNode
  ``--auth-supernode-private-key`` (an EC key on a NIST curve in OpenSSH format). With auth on,
  the SuperLink refuses self-registration: every public key (OpenSSH format) must be registered
  beforehand through the Control API with ``flwr supernode register KEY.pub CONNECTION``
  (``--auth-list-public-keys`` CSV files are no longer accepted in 1.41).

Usage (see deploy/README.md)::

    python deploy/federation.py local -n 3 --contaminated 2 --tls --auth \\
        --run-config "num-server-rounds=2 strategy='clair'"
    python deploy/federation.py print -n 3 --superlink 10.0.0.1:9093 --tls --auth

``local`` starts everything on loopback on free ports, runs the app, stops every process it
started by pid (and the helpers those spawned: SuperExec, ServerApp, ClientApp processes).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import ipaddress
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONNECTION = "clair-deploy"

BASE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "PYTHONUNBUFFERED": "1",
}


# -- ports, environment ---------------------------------------------------------------------

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


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for every Flower process: no ``uv sync``, no telemetry, isolated FLWR_HOME."""
    env = dict(os.environ)
    env.update(BASE_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    if extra:
        env.update(extra)
    return env


def _bin(name: str) -> str:
    """A console script of the running interpreter's environment (the venv), else PATH."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


# -- certificates and keys ------------------------------------------------------------------

@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def generate_tls(directory: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost")) -> TlsFiles:
    """A self-signed CA and a SuperLink certificate for ``hosts`` (IPs and DNS names)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "clair-flower test CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.server_key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    files.server_key.chmod(0o600)
    return files


def generate_node_keys(directory: Path, n: int) -> list[tuple[Path, Path]]:
    """``(private, public)`` OpenSSH-format P-384 key pairs, one per SuperNode."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        key = ec.generate_private_key(ec.SECP384R1())
        priv, pub = directory / f"supernode-{i}", directory / f"supernode-{i}.pub"
        priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
        priv.chmod(0o600)
        pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                      serialization.PublicFormat.OpenSSH) + b"\n")
        out.append((priv, pub))
    return out


# -- configuration and commands -------------------------------------------------------------

@dataclass
class FederationSpec:
    """What to start; ``address`` is what SuperNodes and the CLI dial (host:port)."""

    num_supernodes: int = 3
    contaminated: frozenset[int] = frozenset()
    address: str = "127.0.0.1:9093"
    bind_host: str = "127.0.0.1"
    tls: TlsFiles | None = None
    node_keys: list[tuple[Path, Path]] = field(default_factory=list)
    supernode_ports: list[int] = field(default_factory=list)
    database: str | None = None

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def auth(self) -> bool:
        return bool(self.node_keys)

    def node_config(self, i: int) -> str:
        cfg = f"partition-id={i} num-partitions={self.num_supernodes}"
        if i in self.contaminated:
            cfg += " contaminated=true"
        return cfg

    def superlink_cmd(self) -> list[str]:
        cmd = [_bin("flower-superlink"), "--host", self.bind_host, "--port", str(self.port),
               "--disable-runtime-dependency-installation"]
        if self.tls is None:
            cmd.append("--insecure")
        else:
            cmd += ["--ssl-certfile", str(self.tls.server_cert), "--ssl-keyfile", str(self.tls.server_key),
                    "--ssl-ca-certfile", str(self.tls.ca_cert)]
        if self.auth:
            cmd.append("--enable-supernode-auth")
        if self.database:
            cmd += ["--database", self.database]
        return cmd

    def supernode_cmd(self, i: int) -> list[str]:
        port = self.supernode_ports[i] if i < len(self.supernode_ports) else 9094 + i
        cmd = [_bin("flower-supernode"), "--superlink", self.address, "--port", str(port),
               "--node-config", self.node_config(i)]
        cmd += ["--insecure"] if self.tls is None else ["--root-certificates", str(self.tls.ca_cert)]
        if self.auth:
            cmd += ["--auth-supernode-private-key", str(self.node_keys[i][0])]
        return cmd

    def register_cmd(self, i: int) -> list[str]:
        return [_bin("flwr"), "supernode", "register", str(self.node_keys[i][1]), CONNECTION,
                "--name", f"supernode-{i}"]


def write_flwr_config(flwr_home: Path, address: str, root_certificates: Path | None,
                      name: str = CONNECTION) -> Path:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection, made the default."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{root_certificates}"')
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def app_config_keys(app_dir: Path = REPO_ROOT) -> set[str]:
    """Keys of ``[tool.flwr.app.config]``: ``flwr run --run-config`` accepts only these."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    from flwr.common.config import flatten_dict

    data = tomllib.loads((app_dir / "pyproject.toml").read_text())
    return set(flatten_dict(data["tool"]["flwr"]["app"].get("config", {})))


def fused_run_config(overrides: str | Mapping[str, object] = "", app_dir: Path = REPO_ROOT) -> dict[str, object]:
    """The run config a run will see: ``[tool.flwr.app.config]`` plus ``--run-config`` overrides
    (e.g. to pre-train the matching base model before starting the federation)."""
    from flwr.common.config import flatten_dict, fuse_dicts, get_project_config, parse_config_args

    base = flatten_dict(get_project_config(app_dir)["tool"]["flwr"]["app"].get("config", {}))
    if not isinstance(overrides, str):
        overrides = run_config_string(overrides)
    return dict(fuse_dicts(base, parse_config_args([overrides] if overrides else None)))


def warm_base_model(run_config: str | Mapping[str, object] = "", app_dir: Path = REPO_ROOT) -> Path:
    """Pre-train (or find) the base model the run will use, in ``$CLAIR_FLOWER_CACHE``, so no
    ServerApp/ClientApp process pre-trains it mid-round. Returns the cached file."""
    from server_apps.run_config import RunConfig, model_config, task_config
    from clair_flower.copytask.model import cache_path, default_cache_dir, load_base_model

    cfg = RunConfig.from_mapping(fused_run_config(run_config, app_dir))
    load_base_model(model_config(cfg), task_config(cfg))
    return cache_path(model_config(cfg), task_config(cfg), default_cache_dir())


def run_config_string(values: Mapping[str, object]) -> str:
    """``{"strategy": "clair", "num-server-rounds": 2}`` -> ``strategy='clair' num-server-rounds=2``."""
    parts = []
    for k, v in values.items():
        if isinstance(v, bool):
            parts.append(f"{k}={'true' if v else 'false'}")
        elif isinstance(v, str):
            parts.append(f"{k}='{v}'")
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)


# -- process bookkeeping --------------------------------------------------------------------

def _children_map() -> dict[int, list[int]]:
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
    kids, out, todo = _children_map(), [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _start_time(pid: int) -> str | None:
    """Kernel start time of ``pid`` (tells a reused pid from the process we saw)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
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


def _signal(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


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
    """Processes this module started; ``stop()`` ends them and their descendants by pid."""

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
        self._known[proc.pid] = _start_time(proc.pid)
        return s

    def snapshot(self) -> None:
        """Remember the current descendants (SuperExec, flwr-serverapp/clientapp run detached)."""
        for s in self.started:
            if s.proc.poll() is None:
                for pid in descendants(s.proc.pid):
                    self._known.setdefault(pid, _start_time(pid))

    def _still_ours(self) -> list[int]:
        """Known pids still alive and still the same process (not a reused pid)."""
        return [p for p, t in self._known.items() if _alive(p) and _start_time(p) == t]

    def check_alive(self) -> None:
        for s in self.started:
            if s.proc.poll() is not None:
                raise RuntimeError(f"{s.name} (pid {s.proc.pid}) exited with {s.proc.returncode}; "
                                   f"log {s.log}:\n{tail(s.log)}")

    def stop(self, grace: float = 10.0) -> None:
        self.snapshot()
        # SuperNodes (and flwr run) before the SuperLink
        roots = [s.proc.pid for s in reversed(self.started) if s.proc.poll() is None]
        _signal(roots, signal.SIGTERM)
        deadline = time.time() + grace
        for s in self.started:
            try:
                s.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        _signal([p for p in self._still_ours() if p not in roots], signal.SIGTERM)
        deadline = time.time() + 3.0
        while time.time() < deadline and self._still_ours():
            time.sleep(0.2)
        _signal(self._still_ours(), signal.SIGKILL)
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


def _wait_port(host: str, port: int, timeout: float) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


# -- the local federation -------------------------------------------------------------------

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
        res = subprocess.run([_bin("flwr"), *args], env=self.env, cwd=self.app_dir, capture_output=True,
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
            _wait_port("127.0.0.1", self.spec.port, timeout)
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
        cmd = [_bin("flwr"), "run", str(self.app_dir), CONNECTION, "--stream"]
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
                    run_id = _run_id_from_log(log)
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
                _signal([stream.proc.pid], signal.SIGINT)
                try:
                    stream.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    stream.proc.kill()
                    stream.proc.wait()
        if run_id is None:
            run_id = _run_id_from_log(log)
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


def _run_id_from_log(log: Path) -> int | None:
    import re

    try:
        m = re.search(r"run (?:ID )?(\d{3,})", log.read_text(errors="replace"), re.IGNORECASE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


# -- printing commands for several machines -------------------------------------------------

def print_commands(spec: FederationSpec, app_dir: str = ".", run_config: str = "",
                   certs_dir: str = "certs", keys_dir: str = "keys") -> str:
    """Shell commands for a SuperLink on one host and SuperNodes on others."""
    q = shlex.join
    env = " ".join(f"{k}={v}" for k, v in BASE_ENV.items() if k != "PYTHONUNBUFFERED")
    host = spec.address.rsplit(":", 1)[0]
    out = ["# every host: the project and its venv installed; then", f"export {env}", ""]
    if spec.tls:
        out += ["# once, on the SuperLink host A (certificate valid for the address SuperNodes dial):",
                f"python deploy/federation.py certs --out {certs_dir} --hosts {host} localhost 127.0.0.1",
                f"# copy {certs_dir}/ca.crt to every SuperNode host and to the machine running flwr", ""]
    if spec.auth:
        out += [f"# once: one key pair per SuperNode (private key stays on its host)",
                f"python deploy/federation.py keys --out {keys_dir} -n {spec.num_supernodes}", ""]
    out += ["# host A: the SuperLink (Fleet, Control and Runtime APIs on one port)", q(_plain(spec.superlink_cmd())), ""]
    out += ["# machine running flwr: $FLWR_HOME/config.toml (default ~/.flwr/config.toml)",
            "cat >> \"${FLWR_HOME:-$HOME/.flwr}/config.toml\" <<'EOF'",
            f"[superlink.{CONNECTION}]", f'address = "{spec.address}"',
            "insecure = true" if spec.tls is None
            else f'root-certificates = "{spec.tls.ca_cert.resolve()}"  # must be an absolute path',
            "EOF", ""]
    if spec.auth:
        out += ["# register every SuperNode's public key with the SuperLink (before the nodes start)"]
        out += [q(_plain(spec.register_cmd(i))) for i in range(spec.num_supernodes)] + [""]
    for i in range(spec.num_supernodes):
        out += [f"# SuperNode {i} (its own host, or its own --port on a shared host)"
                + (" -- contaminated" if i in spec.contaminated else ""), q(_plain(spec.supernode_cmd(i)))]
    out += ["", "# run the app (from the project directory)",
            q(["flwr", "run", app_dir, CONNECTION, "--stream"])
            + (f' --run-config "{run_config}"' if run_config and '"' not in run_config
               else (" --run-config " + shlex.quote(run_config) if run_config else ""))]
    return "\n".join(out)


def _plain(cmd: list[str]) -> list[str]:
    return [Path(cmd[0]).name, *cmd[1:]]


# -- CLI ------------------------------------------------------------------------------------

def _ints(text: str) -> frozenset[int]:
    return frozenset(int(x) for x in text.replace(",", " ").split()) if text else frozenset()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("local", "print"):
        s = sub.add_parser(name, help="start on loopback and run" if name == "local" else
                           "print the commands for several machines")
        s.add_argument("-n", "--num-supernodes", type=int, default=3)
        s.add_argument("--contaminated", type=_ints, default=frozenset(),
                       help="partition ids started with contaminated=true, e.g. '0,2'")
        s.add_argument("--tls", action="store_true", help="TLS with a generated CA")
        s.add_argument("--auth", action="store_true", help="SuperNode authentication (implies --tls)")
        s.add_argument("--run-config", "-c", default="",
                       help="flwr run --run-config, e.g. \"num-server-rounds=2 strategy='clair'\"")
    loc = sub.choices["local"]
    loc.add_argument("--workdir", type=Path, default=None, help="certificates, keys, logs, FLWR_HOME")
    loc.add_argument("--timeout", type=float, default=1800.0)
    loc.add_argument("--no-warm", action="store_true",
                     help="skip pre-training the base model before starting the federation")
    loc.add_argument("--keep-running", action="store_true",
                     help="after the run, keep the federation up until Ctrl-C")
    pr = sub.choices["print"]
    pr.add_argument("--superlink", default="SUPERLINK_HOST:9093", help="address SuperNodes dial, HOST:PORT")
    pr.add_argument("--certs-dir", default="certs")
    pr.add_argument("--keys-dir", default="keys")
    c = sub.add_parser("certs", help="generate a CA and a SuperLink certificate")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--hosts", nargs="+", default=["127.0.0.1", "localhost"],
                   help="IPs / DNS names the SuperLink is reached at (first is the CN)")
    w = sub.add_parser("warm", help="pre-train the base model a run config uses (CLAIR_FLOWER_CACHE)")
    w.add_argument("--run-config", "-c", default="")
    k = sub.add_parser("keys", help="generate SuperNode authentication key pairs")
    k.add_argument("--out", type=Path, required=True)
    k.add_argument("-n", "--num-supernodes", type=int, default=3)
    args = p.parse_args(argv)

    if args.cmd == "certs":
        f = generate_tls(args.out, args.hosts)
        print(f"CA {f.ca_cert}\nserver certificate {f.server_cert}\nserver key {f.server_key}")
        return 0
    if args.cmd == "warm":
        print(warm_base_model(args.run_config))
        return 0
    if args.cmd == "keys":
        for priv, pub in generate_node_keys(args.out, args.num_supernodes):
            print(f"{priv}  {pub}")
        return 0
    tls = args.tls or args.auth
    if args.cmd == "print":
        spec = FederationSpec(num_supernodes=args.num_supernodes, contaminated=args.contaminated,
                              address=args.superlink, bind_host="0.0.0.0",
                              supernode_ports=[9094] * args.num_supernodes)
        if tls:
            d = Path(args.certs_dir)
            spec.tls = TlsFiles(d / "ca.crt", d / "server.pem", d / "server.key")
        if args.auth:
            d = Path(args.keys_dir)
            spec.node_keys = [(d / f"supernode-{i}", d / f"supernode-{i}.pub") for i in range(args.num_supernodes)]
        print(print_commands(spec, run_config=args.run_config, certs_dir=args.certs_dir, keys_dir=args.keys_dir))
        return 0

    if not args.no_warm:
        print(f"base model: {warm_base_model(args.run_config)}", flush=True)
    workdir = args.workdir or Path.cwd() / "outputs" / f"deploy-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    with LocalFederation(workdir, args.num_supernodes, args.contaminated, tls=tls, auth=args.auth) as fed:
        print(f"SuperLink {fed.spec.address} ({'TLS' if tls else 'insecure'}"
              f"{', node auth' if args.auth else ''}); {args.num_supernodes} SuperNodes online; "
              f"logs in {fed.logs}", flush=True)
        res = fed.run_app(args.run_config, timeout=args.timeout)
        print(tail(res.log, 40))
        print(f"run {res.run_id}: {res.status} in {res.seconds:.0f}s (flwr run exit {res.returncode})")
        if args.keep_running:
            print("federation up; Ctrl-C stops it", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0 if res.status and res.status.startswith("finished:completed") else 1


if __name__ == "__main__":
    sys.exit(main())
