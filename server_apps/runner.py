"""What the ServerApp does, as a plain function of a Grid and a run config.

``flwr run`` calls it through :mod:`clair_flower.server_apps.copy_server`; tests and the experiment
runner call it with an in-process Grid. Same code either way.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from datetime import datetime
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from clair_flower.server_apps.checkpoint_format import Checkpoint
from clair_flower.server_apps.run_config import RunConfig, base_task_config, lora_spec, model_config
from clair_flower.copytask.model import load_base_model, wrap_lora
from clair_flower.copytask.peft_io import get_adapter_arrays
from clair_flower.server_apps.results import RunWriter, last_value, mean_value
from clair_flower.server_apps.checkpointing import RoundCheckpoints, query_partitions
from clair_flower.server_apps.recording import RecordingStrategy
from clair_flower.server_apps.strategy_factory import build_strategy
from clair_flower.strategies.records import to_arrayrecord

OUTPUT_ENV = "CLAIR_FLOWER_OUTPUT"


def resolve_output_dir(cfg: RunConfig) -> Path:
    """``output-dir`` if set, else ``$CLAIR_FLOWER_OUTPUT`` or ``~/clair-flower-runs``, plus
    a timestamped run folder. Always absolute: the SuperLink's cwd is not the user's."""
    if cfg.output_dir:
        return Path(cfg.output_dir).expanduser()
    root = Path(os.environ.get(OUTPUT_ENV, "~/clair-flower-runs")).expanduser().resolve()
    return root / f"{cfg.strategy}-{datetime.now():%Y%m%d-%H%M%S}"


def initial_adapter(cfg: RunConfig) -> dict[str, np.ndarray]:
    """The adapter every client starts from: fresh LoRA on the cached base model."""
    model = wrap_lora(load_base_model(model_config(cfg), base_task_config(cfg)), lora_spec(cfg), seed=cfg.seed)
    return get_adapter_arrays(model)


def _wait_for_nodes(grid: Grid, minimum: int, timeout: float = 120.0) -> int:
    t0 = time.time()
    while len(nodes := list(grid.get_node_ids())) < minimum and time.time() - t0 < timeout:
        time.sleep(1.0)
    return len(nodes)


def _resume_point(cfg: RunConfig, checkpoints: RoundCheckpoints) -> Checkpoint | None:
    """The checkpoint to continue from, or ``None`` for a fresh start (logged either way).

    With ``resume`` and no checkpoint in the output directory the run starts from round 1:
    a job script may always pass ``resume=true`` and be restarted after any interruption.
    """
    if not cfg.resume:
        checkpoints.clear()
        return None
    ckpt = checkpoints.latest()
    if ckpt is None:
        log(WARNING, "clair-flower: resume: no checkpoint in %s, starting afresh from round 1",
            checkpoints.directory)
        checkpoints.clear()  # leftovers of an interrupted write, if any
        return None
    log(INFO, "clair-flower: resume: checkpoint of round %d found in %s; continuing with round %d of %d",
        ckpt.round, checkpoints.directory, ckpt.round + 1, cfg.num_server_rounds)
    return ckpt


def _previous_rounds(writer: RunWriter, done: int) -> list[dict[str, object]]:
    """The round records of the rounds a resumed run does not repeat."""
    rounds = writer.read_rounds()
    if [int(r["round"]) for r in rounds] != list(range(1, done + 1)):
        log(WARNING, "clair-flower: resume: %s holds rounds %s, not 1..%d; the summary covers "
            "what is there", writer.rounds_path, [r["round"] for r in rounds], done)
    return rounds


def run_federation(grid: Grid, run_config: Mapping[str, object]) -> dict[str, object]:
    """Validate the config, run every round with the chosen strategy, write the results.

    With ``resume`` the run continues from the last checkpoint in ``output-dir`` up to round
    ``num-server-rounds``; the round log continues too.
    """
    cfg = RunConfig.from_mapping(run_config)
    out_dir = resolve_output_dir(cfg)
    writer = RunWriter(out_dir)
    checkpoints = RoundCheckpoints(out_dir, cfg)
    ckpt = _resume_point(cfg, checkpoints)
    done = ckpt.round if ckpt is not None else 0
    writer.reset_rounds(keep_up_to=done)
    expected = int(ckpt.info.get("num-nodes", 0)) if ckpt is not None else 0  # type: ignore[call-overload]
    num_nodes = _wait_for_nodes(grid, max(cfg.min_nodes, expected))
    if ckpt is not None and expected and num_nodes != expected:
        log(WARNING, "clair-flower: resume: %d nodes connected, the checkpointed run had %d",
            num_nodes, expected)
    checkpoints.num_nodes = num_nodes
    strategy = build_strategy(cfg, num_nodes)
    recorder = RecordingStrategy(strategy, writer, label=cfg.strategy, oracle=cfg.strategy == "oracle",
                                 round_offset=done, checkpoints=checkpoints)
    if ckpt is not None:
        recorder.partition_of.update(query_partitions(grid, grid.get_node_ids(), cfg.round_timeout))
        initial_arrays = checkpoints.restore(strategy, ckpt, recorder.partition_of)
        recorder.rounds = _previous_rounds(writer, done)
    else:
        initial_arrays = to_arrayrecord(initial_adapter(cfg))
    log(INFO, "clair-flower: strategy %s on %d nodes, rounds %d to %d; results in %s",
        cfg.strategy, num_nodes, done + 1, cfg.num_server_rounds, out_dir)
    t0 = time.time()
    if done < cfg.num_server_rounds:
        recorder.start(grid=grid, initial_arrays=initial_arrays,
                       num_rounds=cfg.num_server_rounds - done, timeout=cfg.round_timeout,
                       train_config=ConfigRecord(), evaluate_config=ConfigRecord())
    else:
        log(INFO, "clair-flower: resume: all %d rounds were already done; summary rewritten",
            cfg.num_server_rounds)
    summary = summarize(cfg, recorder.rounds, num_nodes, time.time() - t0, out_dir)
    if ckpt is not None:
        summary["resumed-after-round"] = done
    writer.write_summary(summary)
    writer.write_plots(recorder.rounds, cfg.strategy)
    log(INFO, "clair-flower: final benign token-acc %s; summary in %s",
        summary.get("final-benign-token-acc"), out_dir / "summary.json")
    return summary


def summarize(cfg: RunConfig, rounds: list[dict[str, object]], num_nodes: int, seconds: float,
              out_dir: Path) -> dict[str, object]:
    """Headline figures of a run; the per-round table goes along for the Markdown page."""
    table = [{k: r.get(k) for k in ("round", "benign-token-acc", "benign-exact-acc", "flagged-partitions",
                                     "tpr", "fpr", "server-seconds", "client-train-seconds",
                                     "bytes-up", "bytes-down")} for r in rounds]
    return {
        "strategy": cfg.strategy, "attack": cfg.attack, "attack-fraction": cfg.attack_fraction,
        "num-nodes": num_nodes, "num-rounds": len(rounds), "wall-seconds": seconds,
        "final-benign-token-acc": last_value(rounds, "benign-token-acc"),
        "final-benign-exact-acc": last_value(rounds, "benign-exact-acc"),
        "final-tpr": last_value(rounds, "tpr"), "final-fpr": last_value(rounds, "fpr"),
        "final-flagged-partitions": last_value(rounds, "flagged-partitions"),
        "final-benign-backdoor-asr": last_value(rounds, "benign-backdoor-asr"),
        "mean-server-seconds-per-round": mean_value(rounds, "server-seconds"),
        "mean-client-train-seconds-per-round": mean_value(rounds, "client-train-seconds"),
        "total-bytes-up": int(sum(int(r.get("bytes-up-total", 0)) for r in rounds)),  # type: ignore[arg-type]
        "total-bytes-down": int(sum(int(r.get("bytes-down-total", 0)) for r in rounds)),  # type: ignore[arg-type]
        "output-dir": str(out_dir),
        "config": cfg.to_mapping(),
        "rounds": table,
    }
