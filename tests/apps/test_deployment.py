"""Real deployment: a SuperLink and 3 SuperNodes on loopback, ``flwr run . --stream``.

Once insecure, once with TLS (a CA and server certificate generated here) and SuperNode
authentication (EC keys generated here, registered with ``flwr supernode register``).
Every process started is stopped by pid when the federation's context exits, pass or fail.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from deploy.federation import LocalFederation, app_config_keys, free_port, fused_run_config, generate_node_keys, run_config_string, tail

pytestmark = pytest.mark.slow

ROUNDS = 2


@pytest.fixture()
def warm_model_cache(_model_cache, tmp_path):  # noqa: ANN001, ANN201 - the session cache from conftest
    """Pre-train the base model once, here, so no ServerApp/ClientApp process does it.

    The federation's processes inherit ``CLAIR_FLOWER_CACHE`` (the session cache). If the
    user-level cache (``~/.cache/clair-flower``) already holds the same weights (the file
    name is a hash of every field that changes them), they are copied instead of
    pre-training again, which takes minutes on a busy 2-core machine.
    """
    from clair_flower.server_apps.run_config import RunConfig, model_config, task_config
    from clair_flower.copytask.model import cache_path, load_base_model

    # the config the run will use (pyproject defaults + our overrides), not RunConfig()'s
    cfg = RunConfig.from_mapping(fused_run_config(small_run_config(str(tmp_path / "results"))))
    target = cache_path(model_config(cfg), task_config(cfg), _model_cache)
    user = cache_path(model_config(cfg), task_config(cfg), Path.home() / ".cache" / "clair-flower")
    if not target.exists() and user.exists() and user != target:
        tmp = target.with_suffix(".copying")
        shutil.copyfile(user, tmp)
        os.replace(tmp, target)
    load_base_model(model_config(cfg), task_config(cfg), cache_dir=_model_cache)
    return _model_cache


def small_run_config(output_dir: str) -> str:
    """Small settings; ``flwr run --run-config`` accepts only keys of [tool.flwr.app.config]."""
    wanted = {"num-server-rounds": ROUNDS, "local-steps": 5, "num-train": 16, "num-test": 16,
              "strategy": "fedavg", "output-dir": output_dir}
    keys = app_config_keys()
    return run_config_string({k: v for k, v in wanted.items() if k in keys})


@pytest.mark.parametrize("mode", ["insecure", "tls+auth"])
def test_real_deployment(mode: str, tmp_path, warm_model_cache) -> None:  # noqa: ANN001
    secure = mode != "insecure"
    out = (tmp_path / "results").resolve()
    t0 = time.time()
    with LocalFederation(tmp_path / "federation", num_supernodes=3, contaminated=(2,),
                         tls=secure, auth=secure) as fed:
        if secure:
            assert "--enable-supernode-auth" in fed.spec.superlink_cmd()
            assert fed.spec.tls is not None and fed.spec.tls.ca_cert.exists()
            assert "root-certificates" in (fed.flwr_home / "config.toml").read_text()
        res = fed.run_app(small_run_config(str(out)), timeout=480, done=out / "summary.json")
        if secure:  # a SuperNode whose public key was never registered is refused
            (rogue_key, _), = generate_node_keys(tmp_path / "rogue", 1)
            cmd = fed.spec.supernode_cmd(0)
            cmd[cmd.index("--auth-supernode-private-key") + 1] = str(rogue_key)
            cmd[cmd.index("--port") + 1] = str(free_port())
            rogue = fed.procs.start("rogue-supernode", cmd, fed.env, fed.logs / "rogue.log")
            try:
                rogue.proc.wait(timeout=60)
            except Exception:  # noqa: BLE001 - reported by the assert below
                pass
            assert rogue.proc.returncode not in (None, 0), tail(rogue.log)
            assert "Failed to activate SuperNode" in rogue.log.read_text()
        logs = "\n".join(f"--- {s.name}\n{tail(s.log, 30)}" for s in fed.procs.started)
        roots = [s.proc for s in fed.procs.started]
    # after the context: every process we started is gone
    assert all(p.poll() is not None for p in roots), "a started process survived stop()"
    assert res.status == "finished:completed", f"run {res.run_id}: {res.status}\n{logs}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num-rounds"] == ROUNDS
    assert summary["num-nodes"] == 3
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines() if line.strip()]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    print(f"{mode}: run {res.run_id} {res.status} in {res.seconds:.0f}s (total {time.time() - t0:.0f}s)")
