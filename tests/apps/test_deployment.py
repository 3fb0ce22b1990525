"""Real deployment: a SuperLink and 3 SuperNodes on loopback, ``flwr run . --stream``.

Once insecure, once with TLS (a CA and server certificate generated here) and SuperNode
authentication (EC keys generated here, registered with ``flwr supernode register``).
Every process started is stopped by pid when the federation's context exits, pass or fail.
"""

from __future__ import annotations

import json
import time

import pytest

from deploy.federation import LocalFederation, app_config_keys, run_config_string, tail

pytestmark = pytest.mark.slow

ROUNDS = 2


@pytest.fixture(scope="module")
def warm_model_cache(_model_cache):  # noqa: ANN001, ANN201 - the session cache from conftest
    """Pre-train the base model once, here, so no ServerApp/ClientApp process does it."""
    from clair_flower.config import RunConfig, model_config, task_config
    from clair_flower.model import load_base_model

    cfg = RunConfig()
    load_base_model(model_config(cfg), task_config(cfg))
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
        res = fed.run_app(small_run_config(str(out)), timeout=240, done=out / "summary.json")
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
