"""The experiment runner end to end on a 2-cell grid with tiny settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from clair_flower.server_apps import experiments

TINY = """
name = "tiny"
num-nodes = 3
headline-fraction = 0.3
headline-rank = 2

[run-config]
num-server-rounds = 1
local-steps = 2
num-train = 8
num-test = 8

[[grid]]
strategy = ["local", "fedavg"]
attack = ["reversed"]
attack-fraction = [0.3]
lora-rank = [2]
"""


def _grid(tmp_path: Path, text: str = TINY) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(text)
    return path


def test_grid_runs_reports_and_skips_done_cells(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert experiments.main([str(_grid(tmp_path)), "--out", str(out)]) == 0
    first = capsys.readouterr().out
    assert "[1/2]" in first and "[2/2]" in first and "ETA" in first
    for name in ("results.csv", "results.md", "accuracy_per_round.png"):
        assert (out / name).stat().st_size > 0, name
    csv = (out / "results.csv").read_text().splitlines()
    assert len(csv) == 3 and "final-benign-token-acc" in csv[0]
    assert "method x attack" in (out / "results.md").read_text()
    assert experiments.main([str(_grid(tmp_path)), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("skipped (done)") == 2


def test_bad_key_fails_naming_it_before_any_cell_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    bad = TINY.replace("lora-rank = [2]", "lora-rank = [2]\nlocal-stesp = 3")
    assert experiments.main([str(_grid(tmp_path, bad)), "--out", str(out)]) == 2
    assert "local-stesp" in capsys.readouterr().err
    assert not (out / "cells").exists()
    with pytest.raises(experiments.GridError, match="lora-rank"):
        experiments.load_grid(_grid(tmp_path, TINY.replace("lora-rank = [2]", "lora-rank = [0]")), out)


def test_cells_shared_by_two_tables_run_once(tmp_path: Path) -> None:
    text = TINY + '\n[[grid]]\nstrategy = ["fedavg"]\nattack = ["reversed"]\nattack-fraction = [0.0, 0.3]\nlora-rank = [2]\n'
    grid = experiments.load_grid(_grid(tmp_path, text), tmp_path)
    assert sorted(c.name for c in grid.cells) == ["fedavg__reversed__f0.3__r2__s0", "fedavg__reversed__f0__r2__s0",
                                                  "local__reversed__f0.3__r2__s0"]


def test_module_entry_point_runs_the_cli() -> None:
    """``python -m clair_flower.server_apps.experiments`` goes through the package's ``__main__``."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "clair_flower.server_apps.experiments", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "grid file (TOML)" in res.stdout and "--jobs" in res.stdout
