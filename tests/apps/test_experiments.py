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


# -- plots (issue 20, item 5) -----------------------------------------------------------------

from collections.abc import Mapping  # noqa: E402

from clair_flower.server_apps.experiments import plots  # noqa: E402
from clair_flower.server_apps.results import (RunWriter, round_figure,  # noqa: E402
                                              score_heatmap_figure, score_matrix)

CONTAMINATED = (2, 4)


def _round_records(n_rounds: int = 3, n_clients: int = 6) -> list[dict[str, object]]:
    """Round records as RecordingStrategy writes them for a flagging strategy."""
    out = []
    for r in range(1, n_rounds + 1):
        scores = {str(p): {"score-z": (5.0 if p in CONTAMINATED else 0.1 * p) + 0.1 * r, "vote": 0.0,
                           "flagged": int(p in CONTAMINATED and r > 1)} for p in range(n_clients)}
        out.append({"round": r, "benign-token-acc": 0.3 + 0.05 * r, "benign-exact-acc": 0.1, "tpr": 1.0, "fpr": 0.0,
                    "client-scores": scores, "thresholds": {"score-z": 3.5, "vote": 0.5},
                    "contaminated-partitions": list(CONTAMINATED)})
    return out


def _visible_ticks(ax) -> list[float]:  # noqa: ANN001
    lo, hi = sorted(ax.get_xlim())
    return [t for t in ax.get_xticks() if lo <= t <= hi]


def _assert_integer_round_ticks(fig) -> None:  # noqa: ANN001
    for ax in fig.axes:
        if ax.get_xlabel() == "round":
            ticks = _visible_ticks(ax)
            assert ticks and all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)


@pytest.fixture()
def captured(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - yields the list
    """The figures the grid plots save, kept open for inspection (and every figure closed after)."""
    import matplotlib.pyplot as plt

    figures: list = []
    monkeypatch.setattr(plots, "_save", lambda plt, fig, path: figures.append(fig) or path)
    yield figures
    plt.close("all")


def _rows(methods_by_attack: Mapping[str, list[str]]) -> list[dict[str, object]]:
    return [{"strategy": m, "attack": a, "attack-fraction": 0.3, "lora-rank": 4, "seed": 0, "status": "done",
             "rounds": _round_records()} for a, methods in methods_by_attack.items() for m in methods]


@pytest.mark.parametrize("n_rounds", [1, 2, 3, 7])
def test_every_round_axis_has_integer_ticks(n_rounds: int, captured: list, tmp_path: Path) -> None:
    rounds = _round_records(n_rounds)
    figures = [round_figure(rounds, "t", (("benign-token-acc", "acc"),), ylabel="acc", ylim=(0, 1)),
               score_heatmap_figure(rounds, "t")]
    rows = _rows({"reversed": ["fedavg", "clair"]})
    for row in rows:
        row["rounds"] = rounds
    plots.plot_accuracy_per_round(rows, tmp_path / "a.png")
    plots.plot_detection_per_round(rows, tmp_path / "d.png")
    plots.plot_score_heatmaps(rows, tmp_path / "h.png")
    for fig in figures + captured:
        fig.canvas.draw()
        _assert_integer_round_ticks(fig)


def test_all_methods_of_a_grid_share_one_accuracy_figure_with_one_legend(captured: list, tmp_path: Path) -> None:
    every = ["local", "fedavg", "oracle", "krum", "multikrum", "fedmedian", "fedtrimmedavg", "bulyan",
             "ffa-lora", "rolora", "clair", "clair-plus"]
    assert plots.plot_accuracy_per_round(_rows({"reversed": ["local", "clair"], "sign-flip": every}),
                                         tmp_path / "a.png") is not None
    (fig,) = captured
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["local", "clair", *[m for m in every if m not in ("local", "clair")]]
    colours = {(line.get_color(), line.get_linestyle()) for ax in fig.axes for line in ax.get_lines()}
    assert len(colours) == len(every)  # no two methods drawn alike


def test_score_heatmap_marks_flags_contaminated_clients_and_the_threshold(captured: list) -> None:
    rounds = _round_records(3, 6)
    clients, nums, values, flags, bad, threshold = score_matrix(rounds)
    assert clients == [str(p) for p in range(6)] and nums == [1, 2, 3] and threshold == 3.5
    assert bad == {"2", "4"} and flags.sum() == 4 and values[2, 0] == pytest.approx(5.1)
    fig = score_heatmap_figure(rounds, "clair")
    ax, cbar = fig.axes
    assert sorted((round(t.get_position()[0]), round(t.get_position()[1])) for t in ax.texts if t.get_text() == "x") \
        == [(1, 2), (1, 4), (2, 2), (2, 4)]  # (round index, client row) of every flag
    labels = {t.get_text(): t.get_color() for t in ax.get_yticklabels()}
    assert labels["2 *"] == labels["4 *"] == "tab:red" and labels["0"] != "tab:red"
    assert any(list(line.get_ydata()) == [3.5, 3.5] for line in cbar.get_lines())  # the threshold line
    assert score_heatmap_figure([{"round": 1, "benign-token-acc": 0.5}], "fedavg") is None


def test_run_plots_include_the_heatmap_only_for_flagging_runs(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path / "clair")
    assert [p.name for p in writer.write_plots(_round_records(), "clair")] == [
        "benign_accuracy.png", "detection.png", "client_scores.png"]
    plain = [{"round": r, "benign-token-acc": 0.5, "benign-exact-acc": 0.1} for r in (1, 2)]
    assert [p.name for p in RunWriter(tmp_path / "fedavg").write_plots(plain, "fedavg")] == ["benign_accuracy.png"]


CLAIR_GRID = TINY.replace('strategy = ["local", "fedavg"]', 'strategy = ["clair"]').replace(
    "num-server-rounds = 1", "num-server-rounds = 2")


def test_a_clair_cell_records_client_scores_and_draws_the_heatmap(tmp_path: Path) -> None:
    """rounds.jsonl of a real CLAIR cell carries each partition's score and the thresholds; the
    grid's report draws them; Flower's MetricRecord for the round held no per-client list."""
    import json

    out = tmp_path / "out"
    assert experiments.main([str(_grid(tmp_path, CLAIR_GRID)), "--out", str(out)]) == 0
    (cell,) = (out / "cells").iterdir()
    rounds = [json.loads(line) for line in (cell / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for rec in rounds:
        assert set(rec["client-scores"]) == {"0", "1", "2"}, rec
        assert rec["thresholds"] == {"vote": 0.5, "score-z": 3.5}
        assert len(rec["train-metrics"]["votes"]) == 3  # the full detail stays in rounds.jsonl
    assert (out / "score_heatmap.png").stat().st_size > 0
    assert (cell / "client_scores.png").stat().st_size > 0
    # main() quiets Flower's INFO log only while it runs: later in-process users keep theirs.
    import logging

    assert not logging.getLogger("flwr").filters


ONE_SHOT = TINY.replace("num-server-rounds = 1", 'num-server-rounds = 1\nprotocol = "one-shot"').replace(
    'strategy = ["local", "fedavg"]', 'strategy = ["local", "fedavg", "oracle"]')


def test_one_shot_grid_reports_calibration_and_regenerates_a_results_page(tmp_path: Path) -> None:
    out, page = tmp_path / "out", tmp_path / "RESULTS.md"
    assert experiments.main([str(_grid(tmp_path, ONE_SHOT)), "--out", str(out)]) == 0
    csv = (out / "results.csv").read_text().splitlines()
    header = csv[0].split(",")
    local = dict(zip(header, next(line for line in csv if line.startswith("local__")).split(",")))
    assert local["protocol"] == "one-shot" and local["num-server-rounds"] == "1"
    assert 0.0 <= float(local["final-train-token-acc"]) <= 1.0 and local["train-plateau-gain"] != ""
    md = (out / "results.md").read_text()
    assert "Calibration checks" in md and "converged" in md
    (out / "results.md").unlink()
    assert experiments.main([str(_grid(tmp_path, ONE_SHOT)), "--out", str(out), "--report-only",
                             "--results-md", str(page)]) == 0
    assert page.read_text() == (out / "results.md").read_text()
