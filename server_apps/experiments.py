"""The experiment runner: a grid of federations from one TOML file, and the report.

Run ``python -m server_apps.experiments configs/smoke.toml [--out DIR] [--jobs 1] [--threads 1]``.

A grid file has a name, the federation size, the run-config overrides every cell shares,
and one or more ``[[grid]]`` tables. In a ``[[grid]]`` table a list value is an axis and
a scalar is an override for that table only; each table is a cartesian product, and
cells that two tables both describe run once (so the attack table, the fraction sweep and
the rank sweep can share their headline cells)::

    name = "smoke"
    num-nodes = 5
    headline-fraction = 0.3      # the attack table's contaminated fraction
    headline-rank = 4            # the LoRA rank of the attack table and the fraction sweep
    flwr-cells = ["clair__reversed__f0.3__r4__s0"]   # cells --flwr runs on Ray

    [run-config]                 # any key of [tool.flwr.app.config]
    num-server-rounds = 2

    [[grid]]
    strategy = ["local", "fedavg", "clair"]
    attack = ["reversed"]
    attack-fraction = [0.3]

Every cell's run config goes through :meth:`RunConfig.from_mapping` before the first cell
runs, so a typo fails at once and names the key. Each cell is the in-process path (the
same ServerApp and ClientApp code as ``flwr run``, without Ray) writing to
``OUT/cells/<cell>/``; a cell whose ``summary.json`` exists is done and is skipped when
the grid is run again. At the end ``OUT/results.csv``, ``OUT/results.md`` and the PNG
plots are written. ``--flwr`` runs the ``flwr-cells`` through the real ``flwr run .`` on
Ray and prints them next to the in-process result of the same cell.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import numpy as np

from server_apps.run_config import ConfigError, RunConfig
from server_apps.results import (SUMMARY_JSON, format_cell, last_value, markdown_table, mean_value, write_atomic,
                                  write_csv)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "outputs" / "experiments"
CELLS_DIR = "cells"
FLWR_DIR = "flwr"
ERROR_FILE = "error.txt"
TIMING_FILE = "cell-timing.json"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"

#: Top-level keys of a grid file (everything else is a typo).
GRID_FILE_KEYS = ("name", "description", "num-nodes", "headline-fraction", "headline-rank",
                  "flwr-cells", "run-config", "grid")
#: Keys that name a cell, in order, with the short tag used in the cell's name.
NAME_TAGS = (("strategy", ""), ("attack", ""), ("attack-fraction", "f"), ("lora-rank", "r"),
             ("seed", "s"))
#: Strategies that flag clients (their rounds carry TPR/FPR).
FLAGGING = ("clair", "clair-plus", "clair-rolora")
#: Config columns of results.csv, then the figures read from each cell's results.
CONFIG_COLUMNS = ("cell", "strategy", "attack", "attack-fraction", "lora-rank", "seed", "num-nodes",
                  "model-width", "num-server-rounds", "local-steps")
FIGURE_COLUMNS = ("status", "num-rounds", "final-benign-token-acc", "final-benign-exact-acc",
                  "final-tpr", "final-fpr", "final-precision", "final-recall",
                  "mean-benign-token-acc", "mean-benign-exact-acc", "mean-tpr", "mean-fpr",
                  "total-bytes-up", "total-bytes-down", "mean-server-seconds-per-round",
                  "total-server-seconds", "wall-seconds", "cell-wall-seconds", "cell-cpu-seconds",
                  "fallback-rounds", "all-pairs-flagged-rounds", "no-pairs-flagged-rounds", "error")


@dataclass(frozen=True)
class Cell:
    """One federation of the grid: a name, its full run config and the federation size."""

    name: str
    run_config: dict[str, object]
    num_nodes: int
    axes: dict[str, object] = field(default_factory=dict)

    def out_dir(self, out: Path) -> Path:
        return out / CELLS_DIR / self.name

    def is_done(self, out: Path) -> bool:
        return (self.out_dir(out) / SUMMARY_JSON).exists()


@dataclass(frozen=True)
class Grid:
    """A parsed grid file: the cells plus what the report needs to pick its tables."""

    name: str
    cells: list[Cell]
    headline_fraction: float
    headline_rank: int
    flwr_cells: list[str]


# -- loading and validating -------------------------------------------------------------------

class GridError(ValueError):
    """A grid file that cannot be run; the message names the key and the cell."""


def _format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def cell_name(config: Mapping[str, object], extra: Mapping[str, object]) -> str:
    """``strategy__attack__f0.3__r4__s0`` plus ``key=value`` for any other per-table key.

    Names are stable across runs and grid files, so a re-run finds the finished cells.
    """
    parts = [f"{tag}{_format_value(config[key])}" for key, tag in NAME_TAGS]
    parts += [f"{key}={_format_value(v)}" for key, v in sorted(extra.items())]
    return "__".join(parts).replace("/", "_").replace(" ", "")


def _as_list(value: object) -> list[object]:
    return list(value) if isinstance(value, list) else [value]


def expand_table(table: Mapping[str, object], base: Mapping[str, object], num_nodes: int) -> list[Cell]:
    """The cartesian product of one ``[[grid]]`` table over its list-valued keys."""
    table = dict(table)
    nodes_axis = [int(n) for n in _as_list(table.pop("num-nodes", num_nodes))]  # type: ignore[call-overload]
    keys = list(table)
    cells = []
    for nodes, values in product(nodes_axis, product(*(_as_list(table[k]) for k in keys))):
        chosen = dict(zip(keys, values))
        config = {**base, **chosen}
        defaults = RunConfig().to_mapping()
        named = {k: config.get(k, defaults[k]) for k, _ in NAME_TAGS}
        extra = {k: v for k, v in chosen.items() if k not in dict(NAME_TAGS)}
        if nodes != num_nodes:
            extra["n"] = nodes
        cells.append(Cell(cell_name(named, extra), config, nodes, axes={**named, **extra}))
    return cells


def validate_cell(cell: Cell, out: Path) -> None:
    """Build the cell's RunConfig exactly as the ServerApp will; fail naming key and cell."""
    try:
        RunConfig.from_mapping({**cell.run_config, "output-dir": str(cell.out_dir(out))})
    except ConfigError as err:
        raise GridError(f"cell {cell.name}: {err}") from None
    if cell.num_nodes < 2:
        raise GridError(f"cell {cell.name}: num-nodes must be >= 2, got {cell.num_nodes}")


def load_grid(path: str | os.PathLike, out: Path = DEFAULT_OUT) -> Grid:
    """Parse and validate a grid file; every cell is checked before any runs."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise GridError(f"{path}: not valid TOML: {err}") from None
    unknown = [k for k in data if k not in GRID_FILE_KEYS]
    if unknown:
        raise GridError(f"{path}: unknown grid-file key '{unknown[0]}' (allowed: {', '.join(GRID_FILE_KEYS)})")
    if not data.get("grid"):
        raise GridError(f"{path}: no [[grid]] table: nothing to run")
    num_nodes = int(data.get("num-nodes", 10))
    base = dict(data.get("run-config", {}))
    cells: dict[str, Cell] = {}
    for table in data["grid"]:
        for cell in expand_table(table, base, num_nodes):
            cells.setdefault(cell.name, cell)
    for cell in cells.values():
        validate_cell(cell, out)
    defaults = RunConfig.from_mapping(base)
    grid = Grid(name=str(data.get("name", Path(path).stem)), cells=list(cells.values()),
                headline_fraction=float(data.get("headline-fraction", 0.3)),
                headline_rank=int(data.get("headline-rank", defaults.lora_rank)),
                flwr_cells=[str(c) for c in data.get("flwr-cells", [])])
    missing = [c for c in grid.flwr_cells if c not in cells]
    if missing:
        raise GridError(f"{path}: flwr-cells names '{missing[0]}', which is not a cell of the grid")
    return grid


# -- running ------------------------------------------------------------------------------------

def run_cell(cell: Cell, out: Path) -> dict[str, object]:
    """Run one cell in-process; its failure is recorded, not raised, so the grid goes on."""
    from client_apps.copy_client import app as client_app
    from server_apps.inprocess import InProcessGrid, simulation_node_configs
    from server_apps.runner import run_federation

    cell_dir = cell.out_dir(out)
    cell_dir.mkdir(parents=True, exist_ok=True)
    (cell_dir / ERROR_FILE).unlink(missing_ok=True)
    run_config = {**cell.run_config, "output-dir": str(cell_dir)}
    try:
        run_federation(InProcessGrid(client_app, simulation_node_configs(cell.num_nodes), run_config), run_config)
    except Exception as err:  # noqa: BLE001 - one failing cell must not lose the others
        write_atomic(cell_dir / ERROR_FILE, f"{type(err).__name__}: {err}\n")
    return cell_row(cell, out)


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


def cell_row(cell: Cell, out: Path) -> dict[str, object]:
    """One results.csv row, read back from the cell's files (so skipped cells report too)."""
    cell_dir = cell.out_dir(out)
    cfg = RunConfig.from_mapping(cell.run_config)
    row: dict[str, object] = {"cell": cell.name, "num-nodes": cell.num_nodes}
    row.update({k: cfg.to_mapping()[k] for k in CONFIG_COLUMNS if k not in row and k != "cell"})
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
        "rounds": [{k: r.get(k) for k in ("round", "benign-token-acc", "benign-exact-acc", "tpr", "fpr")}
                   for r in rounds],
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


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """``[i/N]`` lines with elapsed time and an ETA from the cells run so far (not skipped)."""

    def __init__(self, total: int, emit: Callable[[str], None] = print) -> None:
        self.total, self.emit = total, emit
        self.t0 = time.time()
        self.done = 0
        self.ran_seconds: list[float] = []

    def finished(self, cell: Cell, row: Mapping[str, object], seconds: float | None) -> None:
        self.done += 1
        if seconds is not None:
            self.ran_seconds.append(seconds)
        remaining = self.total - self.done
        eta = np.mean(self.ran_seconds) * remaining if self.ran_seconds and remaining else 0.0
        how = "skipped (done)" if seconds is None else f"{seconds:.1f} s"
        self.emit(f"[{self.done}/{self.total}] {cell.name}: {how} | {headline(row)} | "
                  f"elapsed {_clock(time.time() - self.t0)}, ETA {_clock(float(eta))}")


def _run_cell_timed(cell: Cell, out: Path, threads: int | None = None) -> tuple[dict[str, object], float]:
    """Run a cell and keep its wall and CPU seconds next to its results.

    CPU seconds are what sizes a grid on a shared machine: wall time there depends on
    everybody else's load, CPU time much less. ``threads`` sets torch's intra-op threads
    for the cell (restored afterwards); local training already uses one.
    """
    import torch

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    t0, c0 = time.time(), time.process_time()
    try:
        run_cell(cell, out)
    finally:
        torch.set_num_threads(old_threads)
    wall, cpu = time.time() - t0, time.process_time() - c0
    write_atomic(cell.out_dir(out) / TIMING_FILE, json.dumps({"cell-wall-seconds": wall, "cell-cpu-seconds": cpu}))
    return cell_row(cell, out), wall


def run_grid(cells: Sequence[Cell], out: Path, jobs: int = 1,
             emit: Callable[[str], None] = print, threads: int | None = None) -> list[dict[str, object]]:
    """Run every cell not yet done (``jobs`` processes), return one row per cell in order."""
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(len(cells), emit)
    rows: dict[str, dict[str, object]] = {}
    todo = []
    for cell in cells:
        if cell.is_done(out):
            rows[cell.name] = cell_row(cell, out)
            progress.finished(cell, rows[cell.name], None)
        else:
            todo.append(cell)
    if jobs <= 1:
        for cell in todo:
            rows[cell.name], secs = _run_cell_timed(cell, out, threads)
            progress.finished(cell, rows[cell.name], secs)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_run_cell_timed, cell, out, threads): cell for cell in todo}
            for fut in as_completed(futures):
                rows[futures[fut].name], secs = fut.result()
                progress.finished(futures[fut], rows[futures[fut].name], secs)
    return [rows[c.name] for c in cells]


# -- the report ---------------------------------------------------------------------------------

def _done(rows: Iterable[Mapping[str, object]]) -> list[Mapping[str, object]]:
    return [r for r in rows if r.get("status") == "done"]


def _seed_mean(rows: Sequence[Mapping[str, object]], key: str) -> float | None:
    vals = [float(r[key]) for r in rows if r.get(key) is not None]  # type: ignore[arg-type]
    return float(np.mean(vals)) if vals else None


def _ordered(values: Iterable[object], order: Sequence[object] = ()) -> list[object]:
    uniq = list(dict.fromkeys(values))
    def key(v: object) -> tuple[int, float, str]:
        number = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.inf
        return (order.index(v) if v in order else len(order), number, str(v))

    return sorted(uniq, key=key)


STRATEGY_ORDER = ("local", "fedavg", "oracle", "krum", "multikrum", "fedmedian", "fedtrimmedavg", "bulyan",
                  "ffa-lora", "rolora", "clair", "clair-plus", "clair-rolora")


def _select(rows: Iterable[Mapping[str, object]], **match: object) -> list[Mapping[str, object]]:
    return [r for r in rows if all(r.get(k.replace("_", "-")) == v for k, v in match.items())]


def pivot(rows: Sequence[Mapping[str, object]], row_key: str, col_key: str, value: str,
          row_order: Sequence[object] = (), col_order: Sequence[object] = ()
          ) -> tuple[list[object], list[object], list[list[float | None]]]:
    """Mean of ``value`` over seeds for each (row, column) pair; None where no cell ran."""
    rks = _ordered((r[row_key] for r in rows), row_order)
    cks = _ordered((r[col_key] for r in rows), col_order)
    table = [[_seed_mean([r for r in rows if r[row_key] == rk and r[col_key] == ck], value) for ck in cks]
             for rk in rks]
    return rks, cks, table


def _md_pivot(title: str, rows: Sequence[Mapping[str, object]], row_key: str, col_key: str, value: str,
              row_order: Sequence[object] = (), col_order: Sequence[object] = ()) -> str:
    if not rows:
        return ""
    rks, cks, table = pivot(rows, row_key, col_key, value, row_order, col_order)
    body = markdown_table([f"{row_key} \\ {col_key}"] + [str(c) for c in cks],
                          [[rk] + vals for rk, vals in zip(rks, table)])
    return f"### {title}\n\n{body}\n"


def _md_detection(title: str, rows: Sequence[Mapping[str, object]], row_key: str) -> str:
    """TPR and FPR (final round, and mean over rounds) of each flagging method, one row per
    value of ``row_key`` (seed means); empty when no flagging method ran."""
    rows = [r for r in rows if r["strategy"] in FLAGGING]
    if not rows:
        return ""
    keys = _ordered(r[row_key] for r in rows)
    strats = _ordered((r["strategy"] for r in rows), STRATEGY_ORDER)
    figures = (("final-tpr", "TPR"), ("final-fpr", "FPR"), ("mean-tpr", "mean TPR"), ("mean-fpr", "mean FPR"))
    header = [row_key] + [f"{s} {label}" for s in strats for _, label in figures]
    table = [[k] + [_seed_mean([r for r in rows if r[row_key] == k and r["strategy"] == s], key)
                    for s in strats for key, _ in figures] for k in keys]
    return f"### {title}\n\n{markdown_table(header, table)}\n"


def attack_rows(rows: Sequence[Mapping[str, object]], grid: Grid) -> list[Mapping[str, object]]:
    """Cells of the method x attack table: headline fraction and rank."""
    return _select(_done(rows), attack_fraction=grid.headline_fraction, lora_rank=grid.headline_rank)


def fraction_rows(rows: Sequence[Mapping[str, object]], grid: Grid) -> list[Mapping[str, object]]:
    """Cells of the accuracy-vs-fraction sweep: headline rank, attacks with > 1 fraction."""
    at_rank = _select(_done(rows), lora_rank=grid.headline_rank)
    swept = {a for a in {r["attack"] for r in at_rank}
             if len({r["attack-fraction"] for r in at_rank if r["attack"] == a}) > 1}
    return [r for r in at_rank if r["attack"] in swept]


def rank_rows(rows: Sequence[Mapping[str, object]], grid: Grid) -> list[Mapping[str, object]]:
    """Cells of the r/p sweep: headline fraction, (attack) groups with > 1 rank."""
    at_f = _select(_done(rows), attack_fraction=grid.headline_fraction)
    swept = {a for a in {r["attack"] for r in at_f}
             if len({r["lora-rank"] for r in at_f if r["attack"] == a}) > 1}
    return [r for r in at_f if r["attack"] in swept]


def gain_over_local(rows: Sequence[Mapping[str, object]], method: str = "clair"
                    ) -> list[tuple[str, int, float, float]]:
    """(attack, rank, r/p, method's final benign token-acc minus local's) per swept rank."""
    out = []
    for attack in _ordered(r["attack"] for r in rows):
        for rank in sorted({int(r["lora-rank"]) for r in rows if r["attack"] == attack}):  # type: ignore[call-overload]
            sel = [r for r in rows if r["attack"] == attack and r["lora-rank"] == rank]
            mine = _seed_mean([r for r in sel if r["strategy"] == method], "final-benign-token-acc")
            local = _seed_mean([r for r in sel if r["strategy"] == "local"], "final-benign-token-acc")
            if mine is not None and local is not None:
                width = int(sel[0]["model-width"])  # type: ignore[call-overload]
                out.append((str(attack), rank, rank / width, mine - local))
    return out


def _seeds(rows: Iterable[Mapping[str, object]]) -> list[int]:
    return sorted({int(r["seed"]) for r in rows})  # type: ignore[call-overload]


def gain_by_seed(rows: Sequence[Mapping[str, object]], method: str = "clair"
                 ) -> dict[tuple[str, int], dict[int, float]]:
    """{(attack, rank): {seed: method's final benign token-acc minus local's}}, same seed only."""
    out: dict[tuple[str, int], dict[int, float]] = {}
    acc = {(r["strategy"], r["attack"], int(r["lora-rank"]), int(r["seed"])): r.get("final-benign-token-acc")  # type: ignore[call-overload]
           for r in rows}
    for (strat, attack, rank, seed), mine in acc.items():
        local = acc.get(("local", attack, rank, seed))
        if strat == method and mine is not None and local is not None:
            out.setdefault((str(attack), rank), {})[seed] = float(mine) - float(local)  # type: ignore[arg-type]
    return out


def seed_spread(rows: Sequence[Mapping[str, object]]) -> list[list[object]]:
    """One row per configuration run with more than one seed: the final benign token
    accuracy of each seed, their mean and range (max - min), and for the flagging methods
    each seed's final TPR and FPR, so the tables' seed means can be read with their spread."""
    done = _done(rows)
    seeds = _seeds(done)
    groups: dict[tuple[object, ...], dict[int, Mapping[str, object]]] = {}
    for r in done:
        key = (r["strategy"], r["attack"], r["attack-fraction"], r["lora-rank"])
        groups.setdefault(key, {})[int(r["seed"])] = r  # type: ignore[call-overload]
    out = []
    for key in sorted((k for k, g in groups.items() if len(g) > 1),
                      key=lambda k: (str(k[1]), float(k[2]), int(k[3]),  # type: ignore[arg-type, call-overload]
                                     STRATEGY_ORDER.index(k[0]) if k[0] in STRATEGY_ORDER else 99)):
        g = groups[key]
        accs = [g[s].get("final-benign-token-acc") if s in g else None for s in seeds]
        vals = [float(a) for a in accs if a is not None]  # type: ignore[arg-type]
        flags = key[0] in FLAGGING
        tpr = [g[s].get("final-tpr") if flags and s in g else None for s in seeds]
        fpr = [g[s].get("final-fpr") if flags and s in g else None for s in seeds]
        out.append([*key, *accs, float(np.mean(vals)) if vals else None,
                    float(max(vals) - min(vals)) if vals else None, *tpr, *fpr])
    return out


def results_markdown(rows: Sequence[Mapping[str, object]], grid: Grid) -> str:
    """The report page: the attack tables, detection, the fraction and r/p sweeps, failures."""
    f, r = grid.headline_fraction, grid.headline_rank
    parts = [f"# Experiment grid: {grid.name}", "",
             f"{len(_done(rows))} of {len(rows)} cells done. Values are final-round means over benign "
             f"clients (mean over seeds where a cell has several: seeds {_seeds(_done(rows))} in this grid; "
             f"\"Seed spread\" lists which configurations have more than one, and each seed's value).", ""]
    head = attack_rows(rows, grid)
    parts.append(_md_pivot(f"Final benign token accuracy, method x attack (fraction {f:g}, rank {r})",
                           head, "strategy", "attack", "final-benign-token-acc", STRATEGY_ORDER))
    parts.append(_md_pivot(f"Final benign exact-sequence accuracy, method x attack (fraction {f:g}, rank {r})",
                           head, "strategy", "attack", "final-benign-exact-acc", STRATEGY_ORDER))
    flag = [x for x in head if x["strategy"] in FLAGGING]
    for key, label in (("final-tpr", "TPR"), ("final-fpr", "FPR"), ("mean-tpr", "TPR, mean over rounds"),
                       ("mean-fpr", "FPR, mean over rounds")):
        parts.append(_md_pivot(f"Detection {label}, flagging methods (fraction {f:g})", flag,
                               "strategy", "attack", key, STRATEGY_ORDER))
    frac = fraction_rows(rows, grid)
    for attack in _ordered(x["attack"] for x in frac):
        parts.append(_md_pivot(f"Final benign token accuracy vs contaminated fraction ({attack}, rank {r})",
                               [x for x in frac if x["attack"] == attack], "attack-fraction", "strategy",
                               "final-benign-token-acc", col_order=STRATEGY_ORDER))
        parts.append(_md_detection(f"Detection vs contaminated fraction ({attack}, rank {r}; TPR is undefined "
                                   f"at fraction 0)", [x for x in frac if x["attack"] == attack], "attack-fraction"))
    ranks = rank_rows(rows, grid)
    for attack in _ordered(x["attack"] for x in ranks):
        sel = [x for x in ranks if x["attack"] == attack]
        parts.append(_md_pivot(f"Final benign token accuracy vs LoRA rank ({attack}, fraction {f:g}, "
                               f"width p = {sel[0]['model-width']})", sel, "lora-rank", "strategy",
                               "final-benign-token-acc", col_order=STRATEGY_ORDER))
        parts.append(_md_detection(f"Detection vs LoRA rank ({attack}, fraction {f:g})", sel, "lora-rank"))
        gains = [g for g in gain_over_local(sel) if g[0] == attack]
        if gains:
            seeds = _seeds(sel) if len(_seeds(sel)) > 1 else []
            per_seed = gain_by_seed(sel)
            header = ["lora-rank", "r/p", "clair - local (token acc" + (", seed mean)" if seeds else ")")]
            table = [[g[1], g[2], g[3]] + [per_seed.get((str(attack), g[1]), {}).get(s) for s in seeds]
                     for g in gains]
            parts.append(f"### CLAIR's gain over local vs r/p ({attack})\n\n"
                         + markdown_table(header + [f"seed {s}" for s in seeds], table) + "\n")
    spread = seed_spread(rows)
    if spread:
        seeds = _seeds(_done(rows))
        parts.append("### Seed spread (configurations run with several seeds; range = max - min)\n\n"
                     + markdown_table(["strategy", "attack", "fraction", "rank"]
                                      + [f"token acc s{s}" for s in seeds] + ["mean", "range"]
                                      + [f"TPR s{s}" for s in seeds] + [f"FPR s{s}" for s in seeds], spread) + "\n")
    voting = [[x["cell"], x.get("num-rounds"), x.get("all-pairs-flagged-rounds"), x.get("no-pairs-flagged-rounds"),
               x.get("final-tpr"), x.get("final-fpr")]
              for x in _done(rows) if x.get("all-pairs-flagged-rounds") is not None]
    if voting:
        parts.append("### CLAIR's pair vote per cell (every pair flagged: the vote was inconclusive and the flags "
                     "came from the score-outlier rule; no pair flagged: the vote saw no contamination)\n\n"
                     + markdown_table(["cell", "rounds", "rounds, every pair flagged", "rounds, no pair flagged",
                                       "final TPR", "final FPR"], voting) + "\n")
    cost = [[x["cell"], x.get("wall-seconds"), x.get("cell-cpu-seconds"), x.get("total-server-seconds"),
             x.get("total-bytes-up"), x.get("fallback-rounds")] for x in _done(rows)]
    if cost:
        total = lambda key: sum(float(x.get(key) or 0.0) for x in _done(rows))  # noqa: E731
        parts.append("### Per-cell cost (fallback rounds: CLAIR fell back instead of refining)\n\n"
                     + markdown_table(["cell", "federation wall s", "cell CPU s", "server s (total)",
                                       "bytes up (total)", "fallback rounds"],
                                      cost, digits=1)
                     + f"\nSum over the {len(cost)} done cells: cell wall {total('cell-wall-seconds'):.0f} s, "
                       f"cell CPU {total('cell-cpu-seconds'):.0f} s, strategy server step "
                       f"{total('total-server-seconds'):.0f} s.\n")
    bad = [x for x in rows if x.get("status") != "done"]
    if bad:
        parts.append("### Cells not done\n\n" + markdown_table(
            ["cell", "status", "error"], [[x["cell"], x["status"], x.get("error")] for x in bad]) + "\n")
    return "\n".join(p for p in parts if p is not None)


def _pyplot():  # noqa: ANN202 - matplotlib.pyplot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(n: int):  # noqa: ANN202
    plt = _pyplot()
    cols = min(n, 3)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def _per_round(rows: Sequence[Mapping[str, object]], key: str) -> tuple[list[int], list[float]]:
    """Seed-mean of ``key`` per round."""
    by_round: dict[int, list[float]] = {}
    for r in rows:
        for rec in r.get("rounds") or []:  # type: ignore[union-attr]
            if rec.get(key) is not None:
                by_round.setdefault(int(rec["round"]), []).append(float(rec[key]))
    xs = sorted(by_round)
    return xs, [float(np.mean(by_round[x])) for x in xs]


def _save(plt, fig, path: Path) -> Path:  # noqa: ANN001
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy_per_round(rows: Sequence[Mapping[str, object]], path: Path) -> Path | None:
    """Benign token accuracy per round, one line per method, one panel per attack."""
    attacks = _ordered(r["attack"] for r in rows)
    if not attacks:
        return None
    plt, fig, axes = _panels(len(attacks))
    for ax, attack in zip(axes, attacks):
        for strat in _ordered((r["strategy"] for r in rows if r["attack"] == attack), STRATEGY_ORDER):
            xs, ys = _per_round(_select(rows, attack=attack, strategy=strat), "benign-token-acc")
            ax.plot(xs, ys, marker="o", ms=3, label=str(strat))
        ax.set(title=str(attack), xlabel="round", ylabel="benign token accuracy")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(plt, fig, path)


def plot_detection_per_round(rows: Sequence[Mapping[str, object]], path: Path) -> Path | None:
    """TPR (solid) and FPR (dashed) per round for the flagging methods, one panel per attack."""
    rows = [r for r in rows if r["strategy"] in FLAGGING and r["attack"] != "none"]
    attacks = _ordered(r["attack"] for r in rows)
    if not attacks:
        return None
    plt, fig, axes = _panels(len(attacks))
    for ax, attack in zip(axes, attacks):
        for i, strat in enumerate(_ordered((r["strategy"] for r in rows if r["attack"] == attack), STRATEGY_ORDER)):
            sel = _select(rows, attack=attack, strategy=strat)
            color = f"C{i}"
            ax.plot(*_per_round(sel, "tpr"), marker="o", ms=3, color=color, label=f"{strat} TPR")
            ax.plot(*_per_round(sel, "fpr"), marker="s", ms=3, ls="--", color=color, label=f"{strat} FPR")
        ax.set(title=str(attack), xlabel="round", ylim=(-0.05, 1.05))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(plt, fig, path)


def plot_accuracy_vs_fraction(rows: Sequence[Mapping[str, object]], path: Path) -> Path | None:
    """Final benign token accuracy vs contaminated fraction, one panel per attack."""
    attacks = _ordered(r["attack"] for r in rows)
    if not attacks:
        return None
    plt, fig, axes = _panels(len(attacks))
    for ax, attack in zip(axes, attacks):
        sel = [r for r in rows if r["attack"] == attack]
        fracs, strats, table = pivot(sel, "attack-fraction", "strategy", "final-benign-token-acc",
                                     col_order=STRATEGY_ORDER)
        for j, strat in enumerate(strats):
            ax.plot(fracs, [np.nan if t[j] is None else t[j] for t in table], marker="o", label=str(strat))
        ax.set(title=str(attack), xlabel="contaminated fraction", ylabel="final benign token accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(plt, fig, path)


def plot_gain_vs_rank(rows: Sequence[Mapping[str, object]], path: Path) -> Path | None:
    """Each method's gain over local-only vs r/p (p = model width), one line per attack."""
    methods = [m for m in _ordered((r["strategy"] for r in rows), STRATEGY_ORDER) if m != "local"]
    curves = {(m, a): [(g[2], g[3]) for g in gain_over_local(rows, m) if g[0] == a]
              for m in methods for a in _ordered(r["attack"] for r in rows)}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for (method, attack), pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{method} ({attack})",
                lw=2.5 if method == "clair" else 1.2)
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="r / p (LoRA rank / model width)", ylabel="final benign token acc - local",
           title="gain over local-only vs r/p")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def write_report(rows: Sequence[Mapping[str, object]], out: Path, grid: Grid) -> list[Path]:
    """results.csv, results.md and the four plots; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / RESULTS_CSV, rows, CONFIG_COLUMNS + FIGURE_COLUMNS)
    write_atomic(out / RESULTS_MD, results_markdown(rows, grid))
    paths = [out / RESULTS_CSV, out / RESULTS_MD]
    for plot, selected, name in (
            (plot_accuracy_per_round, attack_rows(rows, grid), "accuracy_per_round.png"),
            (plot_detection_per_round, attack_rows(rows, grid), "detection_per_round.png"),
            (plot_accuracy_vs_fraction, fraction_rows(rows, grid), "accuracy_vs_fraction.png"),
            (plot_gain_vs_rank, rank_rows(rows, grid), "gain_vs_rank.png")):
        written = plot(selected, out / name)
        if written is not None:
            paths.append(written)
    return paths


# -- the same cells through ``flwr run .`` on Ray -------------------------------------------------

def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "") + "'"


def flwr_command(cell: Cell, out_dir: Path) -> list[str]:
    """``flwr run . --run-config ... --federation-config ...`` for one cell."""
    flwr = str(Path(sys.executable).with_name("flwr"))
    # Every key, not only the grid's overrides: pyproject's defaults and RunConfig's could
    # drift apart, and then the two paths would not run the same cell.
    run_config = {**RunConfig.from_mapping(cell.run_config).to_mapping(), "output-dir": str(out_dir)}
    rc = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
    return [flwr, "run", ".", "--stream", "--run-config", rc, "--federation-config",
            f"num-supernodes={cell.num_nodes} client-resources-num-cpus=1"]


def flwr_env(flwr_home: Path) -> dict[str, str]:
    """A private FLWR_HOME (so its SuperLink can be found and stopped) and no network calls."""
    env = dict(os.environ)
    env.update(FLWR_HOME=str(flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    return env


def run_cell_flwr(cell: Cell, out: Path, timeout: float = 1800.0) -> tuple[dict[str, object], float]:
    """Run one cell with the real ``flwr run .`` (Ray simulation); stop its SuperLink by pid."""
    from server_apps.local_superlink import stop_pids, superlink_pids

    cell_dir = out / FLWR_DIR / CELLS_DIR / cell.name
    home = out / FLWR_DIR / "flwr-home"
    cell_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        proc = subprocess.run(flwr_command(cell, cell_dir), cwd=ROOT, env=flwr_env(home),
                              capture_output=True, text=True, timeout=timeout)
        write_atomic(cell_dir / "flwr-run.log", proc.stdout + proc.stderr)
        if proc.returncode != 0:
            write_atomic(cell_dir / ERROR_FILE, f"flwr run exited {proc.returncode}; see flwr-run.log\n")
    except subprocess.TimeoutExpired:
        write_atomic(cell_dir / ERROR_FILE, f"flwr run timed out after {timeout:.0f} s\n")
    finally:
        stop_pids(superlink_pids(home))
    flwr_out = out / FLWR_DIR
    return cell_row(cell, flwr_out), time.time() - t0


def compare_flwr(cells: Sequence[Cell], out: Path, emit: Callable[[str], None] = print,
                 threads: int | None = None) -> list[dict[str, object]]:
    """Each headline cell on Ray next to the in-process run of the same cell (same seed)."""
    inproc = {r["cell"]: r for r in run_grid(cells, out, emit=emit, threads=threads)}
    result = []
    for cell in cells:
        emit(f"flwr run . ({cell.num_nodes} supernodes on Ray): {cell.name} ...")
        ray_row, secs = run_cell_flwr(cell, out)
        a, b = inproc[cell.name], ray_row
        diff = {k: (None if a.get(k) is None or b.get(k) is None else float(b[k]) - float(a[k]))  # type: ignore[arg-type]
                for k in ("final-benign-token-acc", "final-benign-exact-acc", "final-tpr", "final-fpr")}
        emit(f"  in-process: {headline(a)}\n  flwr run  : {headline(b)} [{secs:.0f} s incl. Ray start]\n"
             f"  difference (flwr - in-process): " + ", ".join(f"{k} {format_cell(v, 4)}" for k, v in diff.items()))
        result.append({"cell": cell.name, "in-process": a, "flwr": b, "difference": diff, "flwr-seconds": secs})
    write_atomic(out / "flwr_comparison.md", markdown_table(
        ["cell", "path", "token acc", "exact acc", "TPR", "FPR", "wall s"],
        [[r["cell"], path, r[path].get("final-benign-token-acc"), r[path].get("final-benign-exact-acc"),
          r[path].get("final-tpr"), r[path].get("final-fpr"), r[path].get("wall-seconds")]
         for r in result for path in ("in-process", "flwr")]))
    return result


# -- command line ----------------------------------------------------------------------------------

def quiet_flower() -> None:
    """Keep only Flower's warnings: a grid's progress lines are the log that matters.

    A filter, not ``setLevel``: Flower sets its logger's level again when its modules load.
    """
    logging.getLogger("flwr").addFilter(lambda record: record.levelno >= logging.WARNING)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m server_apps.experiments", description=__doc__.split("\n")[0])
    parser.add_argument("grid", help="grid file (TOML), e.g. configs/smoke.toml")
    parser.add_argument("--out", default=None, help="output directory (default outputs/experiments/<grid name>)")
    parser.add_argument("--jobs", type=int, default=1, help="cells run in parallel processes (default 1)")
    parser.add_argument("--flwr", action="store_true",
                        help="run the grid's flwr-cells through `flwr run .` on Ray and compare with in-process")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads per in-process cell (default 1, as each Ray client gets "
                             "1 CPU; 0 keeps torch's default). A second thread mostly spins on a shared machine")
    parser.add_argument("--verbose", action="store_true", help="keep Flower's per-round INFO log")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with open(args.grid, "rb") as fh:
            name = str(tomllib.load(fh).get("name", Path(args.grid).stem))
        out = Path(args.out).expanduser().resolve() if args.out else DEFAULT_OUT / name
        grid = load_grid(args.grid, out)
    except tomllib.TOMLDecodeError as err:
        print(f"error: {args.grid}: not valid TOML: {err}", file=sys.stderr)
        return 2
    except (GridError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.verbose:
        quiet_flower()
    t0 = time.time()
    if args.flwr:
        cells = [c for c in grid.cells if c.name in grid.flwr_cells]
        if not cells:
            print("error: the grid file lists no flwr-cells", file=sys.stderr)
            return 2
        compare_flwr(cells, out, threads=args.threads)
        print(f"comparison in {out / 'flwr_comparison.md'} ({time.time() - t0:.0f} s)")
        return 0
    print(f"grid {grid.name}: {len(grid.cells)} cells -> {out}")
    rows = run_grid(grid.cells, out, jobs=args.jobs, threads=args.threads)
    paths = write_report(rows, out, grid)
    print(f"grid {grid.name}: {len(_done(rows))}/{len(rows)} cells done, wall {_clock(time.time() - t0)}; wrote "
          + ", ".join(p.name for p in paths))
    return 0 if all(r.get("status") == "done" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
