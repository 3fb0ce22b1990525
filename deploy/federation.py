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

This module is the command line (``python -m deploy.federation`` from the repository root works
too) and re-exports the pieces: :mod:`deploy.tls` (certificates, node keys), :mod:`deploy.config`
(process environment, command lines, ``config.toml``, run config), :mod:`deploy.local`
(:class:`LocalFederation`) and :mod:`clair_flower.server_apps.processes` (start and stop by pid).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # ``python deploy/federation.py``: import ``deploy`` from the repo root,
    _here = Path(__file__).resolve().parent  # not this folder's modules as top-level names
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from deploy.config import (BASE_ENV, CONNECTION, REPO_ROOT, FederationSpec, app_config_keys,  # noqa: E402
                           flower_env, fused_run_config, run_config_string, warm_base_model, write_flwr_config)
from deploy.local import LocalFederation, RunResult, free_port  # noqa: E402
from deploy.tls import TlsFiles, generate_node_keys, generate_tls  # noqa: E402
from clair_flower.server_apps.processes import ProcessGroup, descendants, tail  # noqa: E402

__all__ = ["BASE_ENV", "CONNECTION", "REPO_ROOT", "FederationSpec", "LocalFederation", "ProcessGroup", "RunResult",
           "TlsFiles", "app_config_keys", "descendants", "flower_env", "free_port", "fused_run_config",
           "generate_node_keys", "generate_tls", "main", "print_commands", "run_config_string", "tail",
           "warm_base_model", "write_flwr_config"]


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
        out += ["# once: one key pair per SuperNode (private key stays on its host)",
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
