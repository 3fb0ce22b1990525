"""The experiment runner: a grid of federations from one TOML file, and the report.

Run ``python -m clair_flower.server_apps.experiments configs/smoke.toml [--out DIR] [--jobs 1] [--threads 1]``.

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

The package, one concept per module: :mod:`.grid` parses a grid file into cells,
:mod:`.run` runs cells (in-process, in a process pool, or through ``flwr run``) and skips
the finished ones, :mod:`.rows` reads a cell's files back as one ``results.csv`` row,
:mod:`.tables` selects and pivots rows, :mod:`.stats` gives seed means with 95% t-intervals
and paired per-seed differences, :mod:`.calibration` checks that each configuration can test
a claim (local converged, collaboration helps, the attack hurts), :mod:`.report` writes
``results.csv`` and ``results.md``, :mod:`.plots` the PNG plots and :mod:`.cli` the command
line. ``--report-only --results-md RESULTS.md`` rewrites the report from finished cells.

Protocols: ``protocol = "rounds"`` (rounds of ``local-steps``) or ``"one-shot"`` (one round,
``local-steps`` to convergence, each client evaluated on what it receives) is a run-config
key, so a ``[[grid]]`` table can sweep it like any other.
"""

from clair_flower.server_apps.experiments.calibration import (ATTACK_DAMAGE, BACKDOOR_SUCCESS, CONFIG_KEY, PLATEAU_TOL,
                                                      Calibration, Check, calibrate, calibrate_all, config_key)
from clair_flower.server_apps.experiments.cli import main, parse_args, quiet_flower
from clair_flower.server_apps.experiments.grid import (CELLS_DIR, DEFAULT_OUT, GRID_FILE_KEYS, NAME_TAGS, ROOT, Cell, Grid,
                                          GridError, cell_name, expand_table, load_grid, validate_cell)
from clair_flower.server_apps.experiments.plots import (plot_accuracy_by_attack, plot_accuracy_per_round, plot_accuracy_vs_fraction,
                                           plot_detection_per_round, plot_gain_vs_rank)
from clair_flower.server_apps.experiments.report import RESULTS_CSV, RESULTS_MD, results_markdown, seed_spread, write_report
from clair_flower.server_apps.experiments.rows import (CONFIG_COLUMNS, ERROR_FILE, FIGURE_COLUMNS, TIMING_FILE, cell_row,
                                          fallback_rounds, headline, vote_rounds)
from clair_flower.server_apps.experiments.stats import Interval, mean_ci, paired_ci
from clair_flower.server_apps.experiments.run import (FLWR_DIR, Progress, compare_flwr, flwr_command, flwr_env, run_cell,
                                         run_cell_flwr, run_grid)
from clair_flower.server_apps.experiments.tables import (FLAGGING, STRATEGY_ORDER, attack_rows, fraction_rows, gain_by_seed,
                                            gain_over_local, pivot, rank_rows)

__all__ = [
    "ATTACK_DAMAGE", "BACKDOOR_SUCCESS", "CONFIG_KEY", "PLATEAU_TOL", "Calibration", "Check", "Interval",
    "calibrate", "calibrate_all", "config_key", "mean_ci", "paired_ci", "plot_accuracy_by_attack",
    "CELLS_DIR", "CONFIG_COLUMNS", "DEFAULT_OUT", "ERROR_FILE", "FIGURE_COLUMNS", "FLAGGING", "FLWR_DIR",
    "GRID_FILE_KEYS", "NAME_TAGS", "RESULTS_CSV", "RESULTS_MD", "ROOT", "STRATEGY_ORDER", "TIMING_FILE",
    "Cell", "Grid", "GridError", "Progress", "attack_rows", "cell_name", "cell_row", "compare_flwr",
    "expand_table", "fallback_rounds", "flwr_command", "flwr_env", "fraction_rows", "gain_by_seed",
    "gain_over_local", "headline", "load_grid", "main", "parse_args", "pivot", "plot_accuracy_per_round",
    "plot_accuracy_vs_fraction", "plot_detection_per_round", "plot_gain_vs_rank", "quiet_flower", "rank_rows",
    "results_markdown", "run_cell", "run_cell_flwr", "run_grid", "seed_spread", "validate_cell", "vote_rounds",
    "write_report",
]
