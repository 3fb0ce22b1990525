"""The command line: ``python -m clair_flower.server_apps.experiments GRID [--out DIR] [--jobs N] [--flwr]``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from clair_flower.server_apps.experiments.grid import DEFAULT_OUT, Grid, GridError, load_grid
from clair_flower.server_apps.experiments.report import RESULTS_MD, write_report
from clair_flower.server_apps.experiments.rows import cell_row
from clair_flower.server_apps.results import write_atomic
from clair_flower.server_apps.experiments.run import clock, compare_flwr, run_grid
from clair_flower.server_apps.experiments.tables import done_rows
from clair_flower.server_apps.run_config import ConfigError

DESCRIPTION = "The experiment runner: a grid of federations from one TOML file, and the report."


def _warnings_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


@contextmanager
def quiet_flower(quiet: bool = True) -> Iterator[None]:
    """Keep only Flower's warnings while the block runs: a grid's progress lines are the log
    that matters.

    A filter, not ``setLevel``: Flower sets its logger's level again when its modules load. It
    is removed on exit, so a program (or test session) that calls :func:`main` in-process keeps
    Flower's INFO log afterwards.
    """
    logger = logging.getLogger("flwr")
    if quiet:
        logger.addFilter(_warnings_only)
    try:
        yield
    finally:
        if quiet:
            logger.removeFilter(_warnings_only)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m clair_flower.server_apps.experiments", description=DESCRIPTION)
    parser.add_argument("grid", help="grid file (TOML), e.g. configs/smoke.toml")
    parser.add_argument("--out", default=None, help="output directory (default outputs/experiments/<grid name>)")
    parser.add_argument("--jobs", type=int, default=1, help="cells run in parallel processes (default 1)")
    parser.add_argument("--flwr", action="store_true",
                        help="run the grid's flwr-cells through `flwr run .` on Ray and compare with in-process")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads per in-process cell (default 1, as each Ray client gets "
                             "1 CPU; 0 keeps torch's default). A second thread mostly spins on a shared machine")
    parser.add_argument("--verbose", action="store_true", help="keep Flower's per-round INFO log")
    parser.add_argument("--no-train-cache", action="store_true",
                        help="train every cell's clients itself (default: cells share identical local "
                             "trainings through OUT/train-cache, with the same results)")
    parser.add_argument("--report-only", action="store_true",
                        help="run no cell: write the report from the cells already done in --out")
    parser.add_argument("--results-md", default=None, metavar="PATH",
                        help="also write the report page to PATH (RESULTS.md is regenerated this way)")
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
    with quiet_flower(not args.verbose):
        return _run(args, grid, out)


def _run(args: argparse.Namespace, grid: Grid, out: Path) -> int:
    """Run the grid (or its flwr-cells on Ray) and write the report; the exit status."""
    t0 = time.time()
    if args.flwr:
        cells = [c for c in grid.cells if c.name in grid.flwr_cells]
        if not cells:
            print("error: the grid file lists no flwr-cells", file=sys.stderr)
            return 2
        compare_flwr(cells, out, threads=args.threads)
        print(f"comparison in {out / 'flwr_comparison.md'} ({time.time() - t0:.0f} s)")
        return 0
    if args.report_only:
        rows = [cell_row(c, out) for c in grid.cells]
    else:
        print(f"grid {grid.name}: {len(grid.cells)} cells -> {out}")
        rows = run_grid(grid.cells, out, jobs=args.jobs, threads=args.threads, train_cache=not args.no_train_cache)
    paths = write_report(rows, out, grid)
    if args.results_md:
        target = Path(args.results_md)
        write_atomic(target, (out / RESULTS_MD).read_text())
        paths.append(target)
    print(f"grid {grid.name}: {len(done_rows(rows))}/{len(rows)} cells done, wall {clock(time.time() - t0)}; wrote "
          + ", ".join(p.name for p in paths))
    return 0 if all(r.get("status") == "done" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
