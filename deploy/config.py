"""What a deployment is configured with: the environment of every Flower process, the
SuperLink and SuperNode command lines (:class:`FederationSpec`), ``$FLWR_HOME/config.toml``,
and the run config a run will see (``[tool.flwr.app.config]`` plus ``--run-config``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from deploy.tls import TlsFiles

REPO_ROOT = Path(__file__).resolve().parent.parent
CONNECTION = "clair-deploy"

BASE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "PYTHONUNBUFFERED": "1",
}


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for every Flower process: no ``uv sync``, no telemetry, isolated FLWR_HOME."""
    env = dict(os.environ)
    env.update(BASE_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    if extra:
        env.update(extra)
    return env


def flower_bin(name: str) -> str:
    """A console script of the running interpreter's environment (the venv), else PATH."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


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
        cmd = [flower_bin("flower-superlink"), "--host", self.bind_host, "--port", str(self.port),
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
        cmd = [flower_bin("flower-supernode"), "--superlink", self.address, "--port", str(port),
               "--node-config", self.node_config(i)]
        cmd += ["--insecure"] if self.tls is None else ["--root-certificates", str(self.tls.ca_cert)]
        if self.auth:
            cmd += ["--auth-supernode-private-key", str(self.node_keys[i][0])]
        return cmd

    def register_cmd(self, i: int) -> list[str]:
        return [flower_bin("flwr"), "supernode", "register", str(self.node_keys[i][1]), CONNECTION,
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
    from clair_flower.server_apps.run_config import RunConfig, model_config, task_config
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
