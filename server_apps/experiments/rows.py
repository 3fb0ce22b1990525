"""One ``results.csv`` row per cell, read back from the cell's files (so a cell skipped
because it was done reports like one that just ran), and its one-line headline."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from clair_flower.server_apps.experiments.grid import Cell
from clair_flower.server_apps.experiments.tables import METHOD_KEY_PREFIX
from clair_flower.server_apps.results import SUMMARY_JSON, format_cell, last_value, mean_value
from clair_flower.server_apps.run_config import RunConfig

ERROR_FILE = "error.txt"
TIMING_FILE = "cell-timing.json"

#: Config columns of results.csv, then the figures read from each cell's results.
CONFIG_COLUMNS = ("cell", "protocol", "planted", "strategy", "attack", "attack-fraction", "lora-rank", "seed",
                  "num-nodes", "model-width", "num-server-rounds", "local-steps", "optimizer")
FIGURE_COLUMNS = ("status", "num-rounds", "final-benign-token-acc", "final-benign-exact-acc",
                  "final-tpr", "final-fpr", "final-precision", "final-recall", "final-backdoor-asr",
                  "final-train-token-acc", "train-plateau-gain",
                  "mean-benign-token-acc", "mean-benign-exact-acc", "mean-tpr", "mean-fpr",
                  "total-bytes-up", "total-bytes-down", "mean-server-seconds-per-round",
                  "total-server-seconds", "wall-seconds", "cell-wall-seconds", "cell-cpu-seconds",
                  "fallback-rounds", "all-pairs-flagged-rounds", "no-pairs-flagged-rounds", "error")

#: What a row keeps of each round record: the per-round curves and the score heatmap's data.
ROUND_KEYS = ("round", "benign-token-acc", "benign-exact-acc", "tpr", "fpr", "client-scores", "thresholds",
              "contaminated-partitions", "train-token-acc", "train-token-acc-q3")


def _read_json_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _timing(cell_dir: Path) -> dict[str, object]:
    path = cell_dir / TIMING_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def fallback_rounds(rounds: Sequence[Mapping[str, object]]) -> int:
    """Rounds in which a CLAIR strategy fell back (solver failure, everyone flagged):
    its accuracy in those rounds is not CLAIR's, so the report must say so."""
    return sum(1 for r in rounds if (r.get("train-metrics") or {}).get("clair-fallback"))  # type: ignore[union-attr]


def vote_rounds(rounds: Sequence[Mapping[str, object]]) -> tuple[int | None, int | None]:
    """(rounds in which every client's pair vote was 1, rounds in which every vote was 0) for a
    CLAIR strategy; (None, None) for the others. Every pair flagged means the decomposition's
    majority vote was inconclusive and the flags came from CLAIR's score-outlier rule alone; no
    pair flagged means the vote saw no contamination."""
    votes = [(r.get("train-metrics") or {}).get("votes") for r in rounds]  # type: ignore[union-attr]
    votes = [[float(x) for x in v] for v in votes if v]
    if not votes:
        return None, None
    return sum(1 for v in votes if min(v) >= 1.0), sum(1 for v in votes if max(v) <= 0.0)


def train_plateau_gain(rounds: Sequence[Mapping[str, object]]) -> float | None:
    """How much the benign clients' train token accuracy still rose at the end of training: the
    larger of its gain over the last quarter of the final round's local steps and, with two or
    more rounds, its gain over the final round. Near zero means local training has converged."""
    acc = [r.get("train-token-acc") for r in rounds]
    if not acc or acc[-1] is None:
        return None
    gains = []
    q3 = rounds[-1].get("train-token-acc-q3")
    if q3 is not None:
        gains.append(float(acc[-1]) - float(q3))  # type: ignore[arg-type]
    if len(acc) >= 2 and acc[-2] is not None:
        gains.append(float(acc[-1]) - float(acc[-2]))  # type: ignore[arg-type]
    return max(gains) if gains else None


def cell_row(cell: Cell, out: Path) -> dict[str, object]:
    """One results.csv row, read back from the cell's files (so skipped cells report too)."""
    cell_dir = cell.out_dir(out)
    cfg = RunConfig.from_mapping(cell.run_config)
    row: dict[str, object] = {"cell": cell.name, "num-nodes": cell.num_nodes}
    row.update({k: cfg.to_mapping()[k] for k in CONFIG_COLUMNS if k not in row and k != "cell"})
    variant = {k: v for k, v in sorted(cell.axes.items()) if k.startswith(METHOD_KEY_PREFIX)}
    if variant:  # a method variant is a method of its own in every table
        row["base-strategy"] = row["strategy"]
        row["strategy"] = f"{row['strategy']} (" + ", ".join(f"{k}={v}" for k, v in variant.items()) + ")"
    summary_path = cell_dir / SUMMARY_JSON
    if not summary_path.exists():
        err = (cell_dir / ERROR_FILE).read_text().strip() if (cell_dir / ERROR_FILE).exists() else "not run"
        row.update(status="error" if err != "not run" else "missing", error=err)
        return row
    summary = json.loads(summary_path.read_text())
    rounds = _read_json_lines(cell_dir / "rounds.jsonl")
    row.update({
        "status": "done", "num-rounds": summary.get("num-rounds"),
        "final-benign-token-acc": summary.get("final-benign-token-acc"),
        "final-benign-exact-acc": summary.get("final-benign-exact-acc"),
        "final-tpr": last_value(rounds, "tpr"), "final-fpr": last_value(rounds, "fpr"),
        "final-precision": last_value(rounds, "precision"), "final-recall": last_value(rounds, "recall"),
        "final-backdoor-asr": last_value(rounds, "benign-backdoor-asr"),
        "final-train-token-acc": last_value(rounds, "train-token-acc"),
        "train-plateau-gain": train_plateau_gain(rounds),
        "mean-benign-token-acc": mean_value(rounds, "benign-token-acc"),
        "mean-benign-exact-acc": mean_value(rounds, "benign-exact-acc"),
        "mean-tpr": mean_value(rounds, "tpr"), "mean-fpr": mean_value(rounds, "fpr"),
        "total-bytes-up": summary.get("total-bytes-up"), "total-bytes-down": summary.get("total-bytes-down"),
        "mean-server-seconds-per-round": summary.get("mean-server-seconds-per-round"),
        "total-server-seconds": sum(float(r.get("server-seconds") or 0.0) for r in rounds),
        "wall-seconds": summary.get("wall-seconds"),
        "fallback-rounds": fallback_rounds(rounds),
        "all-pairs-flagged-rounds": vote_rounds(rounds)[0], "no-pairs-flagged-rounds": vote_rounds(rounds)[1],
        **_timing(cell_dir),
        "rounds": [{k: r.get(k) for k in ROUND_KEYS if k in r} for r in rounds],
    })
    return row


def headline(row: Mapping[str, object]) -> str:
    """The figures of one finished cell, for its progress line."""
    if row.get("status") != "done":
        return f"{row.get('status')}: {row.get('error')}"
    text = f"token-acc {format_cell(row.get('final-benign-token-acc'))} exact {format_cell(row.get('final-benign-exact-acc'))}"
    if row.get("final-tpr") is not None or row.get("final-fpr") is not None:
        text += f" TPR {format_cell(row.get('final-tpr'), 2)} FPR {format_cell(row.get('final-fpr'), 2)}"
    text += f" (federation {format_cell(row.get('wall-seconds'), 1)} s"
    if row.get("cell-cpu-seconds") is not None:
        text += f", CPU {format_cell(row.get('cell-cpu-seconds'), 1)} s"
    return text + ")"
