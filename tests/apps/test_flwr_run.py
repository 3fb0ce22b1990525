"""A real ``flwr run .`` on the Ray simulation backend (slow: Ray takes ~30 s to start)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clair_flower.server_apps.local_superlink import stop_pids, superlink_pids

ROOT = Path(__file__).resolve().parents[2]


def flwr_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLWR_HOME=str(flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    return env


@pytest.mark.slow
def test_flwr_run_on_ray_completes(tmp_path: Path) -> None:
    home, out = tmp_path / "flwr-home", tmp_path / "out"
    flwr = str(Path(sys.executable).with_name("flwr"))
    cmd = [flwr, "run", ".", "--stream",
           "--run-config", f"num-server-rounds=2 local-steps=5 strategy='fedavg' output-dir='{out}'",
           "--federation-config", "num-supernodes=3 client-resources-num-cpus=1"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=flwr_env(home), capture_output=True, text=True, timeout=540)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["num-rounds"] == 2 and summary["num-nodes"] == 3
        assert summary["final-benign-token-acc"] > 0
    finally:
        stop_pids(superlink_pids(home))
