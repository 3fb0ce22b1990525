"""Results files of a run: per-round JSON lines, a summary (JSON and Markdown), plots.

Every file is written to an absolute directory and replaced atomically, so a crash or a
concurrent reader never sees half a file and nothing already written is lost.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

ROUNDS_FILE = "rounds.jsonl"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
ACCURACY_PNG = "benign_accuracy.png"
DETECTION_PNG = "detection.png"


def detection_rates(flagged: set[int], contaminated: set[int], population: set[int]) -> dict[str, float]:
    """TPR, FPR, precision and recall of a flagged set against the ground truth.

    Rates with an empty denominator are NaN (no contaminated client: TPR is undefined).
    """
    tp = len(flagged & contaminated)
    fp = len(flagged - contaminated)
    pos = len(contaminated & population)
    neg = len(population - contaminated)
    nan = float("nan")
    tpr = tp / pos if pos else nan
    return {"tpr": tpr, "fpr": fp / neg if neg else nan,
            "precision": tp / (tp + fp) if tp + fp else nan, "recall": tpr}


def _clean(value: object) -> object:
    """JSON-safe: NaN becomes null, numpy scalars become python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that ``path`` is either the old or the new file, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


class RunWriter:
    """Owns one output directory: appends round records, writes summary and plots."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir).expanduser()
        if not self.out_dir.is_absolute():
            raise ValueError(f"output directory must be absolute, got {out_dir}")
        self.out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def rounds_path(self) -> Path:
        return self.out_dir / ROUNDS_FILE

    def reset_rounds(self, keep_up_to: int = 0) -> None:
        """Start the round log afresh, keeping rounds ``<= keep_up_to`` (used by resume)."""
        kept = [r for r in self.read_rounds() if int(r["round"]) <= keep_up_to]
        write_atomic(self.rounds_path, "".join(json.dumps(_clean(r)) + "\n" for r in kept))

    def append_round(self, record: Mapping[str, object]) -> None:
        with open(self.rounds_path, "a") as fh:
            fh.write(json.dumps(_clean(record)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_rounds(self) -> list[dict]:
        """The round records, in order. A cut-off last line (a crash mid-append) is skipped;
        a malformed line before it is an error naming the line."""
        if not self.rounds_path.exists():
            return []
        lines = [(i, line) for i, line in enumerate(self.rounds_path.read_text().splitlines(), 1) if line.strip()]
        out = []
        for j, (i, line) in enumerate(lines):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                if j == len(lines) - 1:
                    break
                raise ValueError(f"{self.rounds_path} line {i} is not a JSON record: {err}") from None
        return out

    def write_summary(self, summary: Mapping[str, object]) -> None:
        write_atomic(self.out_dir / SUMMARY_JSON, json.dumps(_clean(summary), indent=2) + "\n")
        write_atomic(self.out_dir / SUMMARY_MD, summary_markdown(summary))

    def write_plots(self, rounds: Sequence[Mapping[str, object]], title: str) -> list[Path]:
        """Benign accuracy per round, and TPR/FPR per round when the strategy flags."""
        paths = [_round_plot(self.out_dir / ACCURACY_PNG, rounds, title,
                             (("benign-token-acc", "token accuracy"), ("benign-exact-acc", "exact-sequence accuracy")),
                             ylabel="mean over benign clients", ylim=(0, 1))]
        if any(r.get("tpr") is not None for r in rounds):
            paths.append(_round_plot(self.out_dir / DETECTION_PNG, rounds, f"{title}: detection",
                                     (("tpr", "TPR"), ("fpr", "FPR")), ylabel="rate", ylim=(-0.05, 1.05)))
        return paths


def _round_plot(path: Path, rounds: Sequence[Mapping[str, object]], title: str,
                series: Sequence[tuple[str, str]], ylabel: str, ylim: tuple[float, float]) -> Path:
    """One line per (record key, label) against the round number, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [int(r["round"]) for r in rounds]  # type: ignore[call-overload]
    fig, ax = plt.subplots(figsize=(6, 4))
    for (key, label), marker in zip(series, "os^v"):
        ax.plot(xs, [_num(r.get(key)) for r in rounds], marker=marker, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def last_value(rounds: Sequence[Mapping[str, object]], key: str) -> object:
    """The latest round's value of ``key`` that is not missing (None if none is)."""
    for r in reversed(rounds):
        if r.get(key) is not None:
            return r[key]
    return None


def mean_value(rounds: Sequence[Mapping[str, object]], key: str) -> float | None:
    """Mean of ``key`` over the rounds that have it (None if none does)."""
    vals = [float(r[key]) for r in rounds if r.get(key) is not None]  # type: ignore[arg-type]
    return float(np.mean(vals)) if vals else None


def _num(value: object) -> float:
    return float("nan") if value is None else float(value)  # type: ignore[arg-type]


def summary_markdown(summary: Mapping[str, object]) -> str:
    """The summary as a Markdown page: key figures, then one row per round."""
    lines = [f"# Run summary: {summary.get('strategy', '?')}", ""]
    for key, value in summary.items():
        if key in ("rounds", "config"):
            continue
        lines.append(f"- **{key}**: {format_cell(value, sep=', ')}")
    rounds = summary.get("rounds") or []
    if rounds:
        cols = ["round", "benign-token-acc", "benign-exact-acc", "flagged-partitions", "tpr", "fpr",
                "server-seconds", "client-train-seconds", "bytes-up", "bytes-down"]
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rounds:  # type: ignore[union-attr]
            lines.append("| " + " | ".join(format_cell(r.get(c), sep=", ") for c in cols) + " |")
    return "\n".join(lines) + "\n"


# -- tables shared by experiment reports (Flower-free) ----------------------------------------

def format_cell(value: object, digits: int = 3, sep: str = " ") -> str:
    """One table cell: floats to ``digits`` places, missing or NaN as ``-``, lists joined by ``sep``.

    Reports compare many runs side by side, so every number gets the same precision.
    """
    value = _clean(value)
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, (list, tuple)):
        return sep.join(str(v) for v in value) or "-"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table; numbers right-aligned so columns read easily."""
    numeric = [all(isinstance(_clean(r[i]), (int, float)) or _clean(r[i]) is None for r in rows) and rows
               for i in range(len(header))]
    align = ["---:" if num else "---" for num in numeric]
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "| " + " | ".join(align) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(v, digits) for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> None:
    """One row per mapping, ``columns`` in order; NaN and missing values are empty cells.

    Written atomically like every other results file, so a re-run never leaves half a CSV.
    """
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        cells = []
        for col in columns:
            v = _clean(row.get(col))
            cells.append("" if v is None else (" ".join(str(x) for x in v) if isinstance(v, list) else v))
        writer.writerow(cells)
    write_atomic(path, buf.getvalue())
