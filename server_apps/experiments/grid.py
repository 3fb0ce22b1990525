"""A grid file parsed into cells: cartesian products of ``[[grid]]`` tables, every cell's
run config validated before any cell runs (the file format is in the package docstring)."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

from clair_flower.server_apps.results import SUMMARY_JSON
from clair_flower.server_apps.run_config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "outputs" / "experiments"
CELLS_DIR = "cells"

#: Top-level keys of a grid file (everything else is a typo).
GRID_FILE_KEYS = ("name", "description", "num-nodes", "headline-fraction", "headline-rank",
                  "flwr-cells", "run-config", "grid")
#: Keys that name a cell, in order, with the short tag used in the cell's name.
NAME_TAGS = (("strategy", ""), ("attack", ""), ("attack-fraction", "f"), ("lora-rank", "r"),
             ("seed", "s"))


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
