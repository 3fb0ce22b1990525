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
SCORES_PNG = "client_scores.png"


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
        """Benign accuracy per round; TPR/FPR per round and the clients x rounds score heatmap
        when the strategy flags."""
        figures = [(ACCURACY_PNG, round_figure(rounds, title,
                                               (("benign-token-acc", "token accuracy"),
                                                ("benign-exact-acc", "exact-sequence accuracy")),
                                               ylabel="mean over benign clients", ylim=(0, 1)))]
        if any(r.get("tpr") is not None for r in rounds):
            figures.append((DETECTION_PNG, round_figure(rounds, f"{title}: detection", (("tpr", "TPR"), ("fpr", "FPR")),
                                                        ylabel="rate", ylim=(-0.05, 1.05))))
        heatmap = score_heatmap_figure(rounds, f"{title}: per-client score")
        if heatmap is not None:
            figures.append((SCORES_PNG, heatmap))
        return [save_figure(fig, self.out_dir / name) for name, fig in figures]


def _pyplot():  # noqa: ANN202 - matplotlib.pyplot, imported only when a plot is drawn
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:  # noqa: ANN001 - a matplotlib Figure
    """Lay out, write and close ``fig`` (closing keeps a long grid from holding every figure)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def integer_round_ticks(ax) -> None:  # noqa: ANN001 - a matplotlib Axes
    """Rounds are whole numbers: no tick at 1.5 on a round axis, and one tick, not 0.96 ... 1.04,
    when a run has a single round (``min_n_ticks=1``: integers even when one fits in the view)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def round_figure(rounds: Sequence[Mapping[str, object]], title: str, series: Sequence[tuple[str, str]],
                 ylabel: str, ylim: tuple[float, float]):  # noqa: ANN201 - a matplotlib Figure
    """One line per (record key, label) against the round number, on integer round ticks."""
    xs = [int(r["round"]) for r in rounds]  # type: ignore[call-overload]
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    for (key, label), marker in zip(series, "os^v"):
        ax.plot(xs, [_num(r.get(key)) for r in rounds], marker=marker, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_ylim(*ylim)
    ax.set_title(title)
    integer_round_ticks(ax)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


# -- the clients x rounds view of a flagging strategy --------------------------------------------

SCORE_KEY = "score-z"
"""The per-client score a heatmap shows: the robust z of CLAIR's score, which the score-outlier
rule compares with its threshold (``thresholds["score-z"]`` of a round record)."""


def _client_order(key: str) -> tuple[int, float, str]:
    """Partitions in numeric order, then clients known only by node id."""
    return (0, float(key), "") if key.lstrip("-").isdigit() else (1, 0.0, key)


def score_matrix(rounds: Sequence[Mapping[str, object]], key: str = SCORE_KEY
                 ) -> tuple[list[str], list[int], np.ndarray, np.ndarray, set[str], float | None]:
    """The heatmap's data from round records (``client-scores``, by partition).

    Returns
    -------
    clients, round numbers, scores (clients x rounds, NaN where a client did not take part),
    flags (same shape, True where the round flagged the client), the contaminated clients
    (ground truth of any round), and the threshold of ``key`` (None if no round recorded one).
    """
    scored = [r for r in rounds if isinstance(r.get("client-scores"), Mapping)]
    clients = sorted({str(c) for r in scored for c in r["client-scores"]}, key=_client_order)  # type: ignore[union-attr]
    nums = [int(r["round"]) for r in scored]  # type: ignore[call-overload]
    values = np.full((len(clients), len(scored)), np.nan)
    flags = np.zeros(values.shape, dtype=bool)
    row = {c: i for i, c in enumerate(clients)}
    threshold = None
    for j, r in enumerate(scored):
        for c, entry in r["client-scores"].items():  # type: ignore[union-attr]
            if entry.get(key) is not None:
                values[row[str(c)], j] = float(entry[key])
            flags[row[str(c)], j] = bool(entry.get("flagged"))
        thresholds = r.get("thresholds")
        if isinstance(thresholds, Mapping) and thresholds.get(key) is not None:
            threshold = float(thresholds[key])
    bad = {str(c) for r in scored for c in (r.get("contaminated-partitions") or [])}  # type: ignore[union-attr]
    return clients, nums, values, flags, bad, threshold


def draw_score_heatmap(ax, rounds: Sequence[Mapping[str, object]], title: str) -> bool:  # noqa: ANN001
    """Clients x rounds heatmap of the per-client score on ``ax``; False when no round has scores.

    The colour scale is centred on the flag threshold (red above, blue below) and the colour bar
    marks it; a flagged cell carries an ``x``; contaminated clients' labels are red with ``*``.
    """
    from matplotlib.colors import TwoSlopeNorm

    clients, nums, values, flags, bad, threshold = score_matrix(rounds)
    if not clients or not np.isfinite(values).any():
        return False
    centre = threshold if threshold is not None else float(np.nanmedian(values))
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    norm = TwoSlopeNorm(vcenter=centre, vmin=min(lo, centre - 1.0), vmax=max(hi, centre + 1.0))
    image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap="coolwarm", norm=norm,
                      interpolation="nearest")
    cbar = ax.figure.colorbar(image, ax=ax)
    cbar.set_label("robust z of CLAIR's score")
    if threshold is not None:
        cbar.ax.axhline(threshold, color="black", lw=2)
        cbar.ax.text(0.5, threshold, f" {threshold:g}", va="bottom", ha="left", fontsize=7,
                     transform=cbar.ax.get_yaxis_transform())
    for i, j in zip(*np.nonzero(flags)):
        ax.text(j, i, "x", ha="center", va="center", fontsize=10, fontweight="bold")
    ax.set_xticks(range(len(nums)), [str(n) for n in nums])
    ax.set_yticks(range(len(clients)), [f"{c} *" if c in bad else c for c in clients])
    for label, c in zip(ax.get_yticklabels(), clients):
        if c in bad:
            label.set_color("tab:red")
            label.set_fontweight("bold")
    ax.set(xlabel="round", ylabel="client (partition)", title=title)
    return True


def score_heatmap_figure(rounds: Sequence[Mapping[str, object]], title: str):  # noqa: ANN201
    """The heatmap as its own figure, with a legend line; None when no round has client scores."""
    clients, nums, *_ = score_matrix(rounds)
    if not clients:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 0.6 * len(nums) + 3), max(3.0, 0.3 * len(clients) + 1.6)))
    if not draw_score_heatmap(ax, rounds, f"{title}\nx: flagged, red *: contaminated, bar line: threshold"):
        plt.close(fig)
        return None
    return fig


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
