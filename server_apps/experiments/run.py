"""Running cells: one in-process, the grid in a process pool (cells already done are
skipped, so a grid resumes where it stopped), and the same cells through ``flwr run .`` on Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from clair_flower.server_apps.experiments.grid import CELLS_DIR, ROOT, Cell
from clair_flower.server_apps.experiments.rows import ERROR_FILE, TIMING_FILE, cell_row, headline
from clair_flower.server_apps.results import format_cell, markdown_table, write_atomic
from clair_flower.server_apps.run_config import RunConfig

FLWR_DIR = "flwr"


TRAIN_CACHE_DIR = "train-cache"


def run_cell(cell: Cell, out: Path, train_cache: bool = True) -> dict[str, object]:
    """Run one cell in-process; its failure is recorded, not raised, so the grid goes on.

    With ``train_cache`` the clients share ``OUT/train-cache``: a local training that another
    cell already did (same received adapter, data, config; every strategy's first round, and
    all of the one-shot protocol) is read back instead of recomputed, bit for bit the same.
    """
    from clair_flower.client_apps.copy_client import app as client_app
    from clair_flower.server_apps.inprocess import InProcessGrid, simulation_node_configs
    from clair_flower.server_apps.runner import run_federation

    cell_dir = cell.out_dir(out)
    cell_dir.mkdir(parents=True, exist_ok=True)
    (cell_dir / ERROR_FILE).unlink(missing_ok=True)
    run_config = {**cell.run_config, "output-dir": str(cell_dir)}
    if train_cache:
        run_config["train-cache-dir"] = str(out / TRAIN_CACHE_DIR)
    try:
        run_federation(InProcessGrid(client_app, simulation_node_configs(cell.num_nodes), run_config), run_config)
    except Exception as err:  # noqa: BLE001 - one failing cell must not lose the others
        write_atomic(cell_dir / ERROR_FILE, f"{type(err).__name__}: {err}\n")
    return cell_row(cell, out)


def clock(seconds: float) -> str:
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
                  f"elapsed {clock(time.time() - self.t0)}, ETA {clock(float(eta))}")


def _run_cell_timed(cell: Cell, out: Path, threads: int | None = None,
                    train_cache: bool = True) -> tuple[dict[str, object], float]:
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
        run_cell(cell, out, train_cache)
    finally:
        torch.set_num_threads(old_threads)
    wall, cpu = time.time() - t0, time.process_time() - c0
    write_atomic(cell.out_dir(out) / TIMING_FILE, json.dumps({"cell-wall-seconds": wall, "cell-cpu-seconds": cpu}))
    return cell_row(cell, out), wall


def run_grid(cells: Sequence[Cell], out: Path, jobs: int = 1, emit: Callable[[str], None] = print,
             threads: int | None = None, train_cache: bool = True) -> list[dict[str, object]]:
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
            rows[cell.name], secs = _run_cell_timed(cell, out, threads, train_cache)
            progress.finished(cell, rows[cell.name], secs)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_run_cell_timed, cell, out, threads, train_cache): cell for cell in todo}
            for fut in as_completed(futures):
                rows[futures[fut].name], secs = fut.result()
                progress.finished(futures[fut], rows[futures[fut].name], secs)
    return [rows[c.name] for c in cells]


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
    from clair_flower.server_apps.local_superlink import stop_pids, superlink_pids

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
