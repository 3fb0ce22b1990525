"""Checkpoints of a federation's server state: safetensors for arrays, JSON for the rest.

A checkpoint of round ``N`` is two files in one directory::

    round-000003.safetensors   every array, under a namespaced name (see below)
    round-000003.json          round, strategy, run config, per-strategy metadata, and the
                               SHA-256 of the arrays file

The arrays file is written first and the JSON sidecar last, each to a temporary file that
``os.replace`` then moves into place, so a crash at any moment leaves the previous checkpoint
intact: a round whose sidecar is missing is incomplete and ignored. Nothing is pickled, so
loading a checkpoint never runs code. The last ``keep`` checkpoints are kept.

Array names in the safetensors file::

    global/<key>                      the arrays the next round starts from
    shared/<name>/<key>               a strategy's shared state dict (e.g. the consensus)
    client/<id>/<name>/<key>          a strategy's per-client state dict (e.g. adapters)

Per-client state is keyed by a *stable* client identity (the partition id), never by a
Flower node id, which changes from run to run. Translating between the two is the caller's
job (:meth:`StrategyState.rekeyed`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clair_flower.strategies.state import CheckpointError, HasServerState, StrategyState

FORMAT = "clair-flower-checkpoint"
VERSION = 1
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^round-(\d{6})\.json$")
_SEP = "/"

State = dict[str, np.ndarray]


@dataclass
class Checkpoint:
    """Everything a resumed run needs to continue after ``round``.

    Attributes
    ----------
    round : int
        Last completed round (training, evaluation and its results record written).
    strategy : str
        Strategy name of the run that wrote it.
    config : dict
        The run config of that run (kebab-case keys), to refuse resuming another experiment.
    global_arrays : state dict
        The arrays the next round starts from.
    state : StrategyState
        The strategy's own state, per-client parts keyed by stable client identity.
    info : dict
        Free-form JSON facts about the run (e.g. the number of nodes).
    """

    round: int
    strategy: str
    config: dict[str, object]
    global_arrays: State
    state: StrategyState = field(default_factory=StrategyState)
    info: dict[str, object] = field(default_factory=dict)


# -- writing ---------------------------------------------------------------------------------

def _stem(server_round: int) -> str:
    return f"round-{server_round:06d}"


def _check_name(name: str, what: str) -> None:
    if not name or _SEP in name:
        raise CheckpointError(f"{what} name {name!r} must be non-empty and contain no '{_SEP}'")


def _flatten(ckpt: Checkpoint) -> State:
    """Every array of the checkpoint under its namespaced name (see the module docstring)."""
    out: State = {f"global{_SEP}{k}": v for k, v in ckpt.global_arrays.items()}
    for name, state in ckpt.state.shared.items():
        _check_name(name, "shared state")
        out.update({f"shared{_SEP}{name}{_SEP}{k}": v for k, v in state.items()})
    for name, by_client in ckpt.state.per_client.items():
        _check_name(name, "per-client state")
        for cid, state in by_client.items():
            out.update({f"client{_SEP}{int(cid)}{_SEP}{name}{_SEP}{k}": v for k, v in state.items()})
    bad = [k for k, v in out.items() if np.asarray(v).dtype == object]
    if bad:
        raise CheckpointError(f"arrays of dtype object cannot be saved: {bad[:3]}")
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _layout(state: StrategyState) -> dict[str, object]:
    """Which state dicts exist, so that empty ones survive the round trip."""
    return {"shared": sorted(state.shared),
            "per-client": {n: sorted(int(c) for c in by) for n, by in state.per_client.items()}}


def _json_dumps(obj: object) -> str:
    try:
        return json.dumps(obj, indent=1, sort_keys=True, allow_nan=True)
    except TypeError as err:
        raise CheckpointError(f"checkpoint metadata must be JSON values: {err}") from None


def _replace_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` is either its old or its new content, never a mix."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(directory: str | os.PathLike, ckpt: Checkpoint, keep: int = 2) -> Path:
    """Write ``ckpt`` atomically into ``directory``; keep only the last ``keep`` rounds.

    Returns
    -------
    Path
        The JSON sidecar, whose presence marks the checkpoint complete.
    """
    from safetensors.numpy import save

    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = _stem(int(ckpt.round))
    payload = save(_flatten(ckpt), metadata={"format": FORMAT, "round": str(int(ckpt.round))})
    sidecar = {
        "format": FORMAT, "version": VERSION, "round": int(ckpt.round), "strategy": ckpt.strategy,
        "config": ckpt.config, "info": ckpt.info, "meta": ckpt.state.meta,
        "per-client-meta": {n: {str(int(c)): v for c, v in by.items()}
                            for n, by in ckpt.state.per_client_meta.items()},
        "layout": _layout(ckpt.state),
        "arrays-file": f"{stem}.safetensors",
        "arrays-sha256": hashlib.sha256(payload).hexdigest(),
    }
    text = _json_dumps(sidecar)  # before any write: bad metadata leaves nothing behind
    _replace_atomic(directory / f"{stem}.safetensors", payload)
    _replace_atomic(directory / f"{stem}.json", text.encode())
    for old in checkpoint_rounds(directory)[:-keep]:
        for suffix in (".json", ".safetensors"):  # sidecar first: never a complete-looking half
            (directory / f"{_stem(old)}{suffix}").unlink(missing_ok=True)
    return directory / f"{stem}.json"


def checkpoint_rounds(directory: str | os.PathLike) -> list[int]:
    """Rounds with a JSON sidecar in ``directory`` (complete or not yet verified), ascending."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := _NAME.match(p.name)))


def clear_checkpoints(directory: str | os.PathLike) -> int:
    """Delete every checkpoint file (and leftover temporary file) in ``directory``.

    Returns the number of files removed. Other files are left alone.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    pattern = re.compile(r"^\.?round-\d{6}\.(json|safetensors)(\..*\.tmp)?$")
    removed = 0
    for p in directory.iterdir():
        if pattern.match(p.name) and p.is_file():
            p.unlink()
            removed += 1
    return removed


# -- reading ---------------------------------------------------------------------------------

def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is unusable: {why}. Delete {path.stem}.* in "
                           f"{path.parent} to resume from the checkpoint before it, or run "
                           f"without resume to start afresh")


def _unflatten(arrays: Mapping[str, np.ndarray], layout: Mapping[str, object], path: Path
               ) -> tuple[State, StrategyState]:
    state = StrategyState(shared={str(n): {} for n in layout.get("shared", [])},  # type: ignore[union-attr]
                          per_client={str(n): {int(c): {} for c in cs}  # type: ignore[union-attr]
                                      for n, cs in layout.get("per-client", {}).items()})  # type: ignore[union-attr]
    global_arrays: State = {}
    for name, value in arrays.items():
        kind, _, rest = name.partition(_SEP)
        if kind == "global" and rest:
            global_arrays[rest] = value
        elif kind == "shared" and _SEP in rest:
            group, _, key = rest.partition(_SEP)
            state.shared.setdefault(group, {})[key] = value
        elif kind == "client" and rest.count(_SEP) >= 2:
            cid, group, key = rest.split(_SEP, 2)
            try:
                client = int(cid)
            except ValueError:
                raise _corrupt(path, f"array {name!r} has a client id that is not an integer") from None
            state.per_client.setdefault(group, {}).setdefault(client, {})[key] = value
        else:
            raise _corrupt(path, f"unexpected array name {name!r}")
    return global_arrays, state


def load_checkpoint(sidecar: str | os.PathLike) -> Checkpoint:
    """Read one checkpoint from its JSON sidecar, verifying the arrays file's checksum.

    Raises
    ------
    CheckpointError
        If either file is missing, unreadable, not a checkpoint of this format, or the arrays
        do not match the checksum the sidecar recorded.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(sidecar)
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupt(path, f"the JSON sidecar cannot be read ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _corrupt(path, f"not a {FORMAT} file")
    if meta.get("version") != VERSION:
        raise _corrupt(path, f"format version {meta.get('version')!r}, this code reads {VERSION}")
    for key in ("round", "strategy", "config", "arrays-file", "arrays-sha256", "layout"):
        if key not in meta:
            raise _corrupt(path, f"the sidecar lacks '{key}'")
    arrays_path = path.parent / str(meta["arrays-file"])
    try:
        payload = arrays_path.read_bytes()
    except FileNotFoundError:
        raise _corrupt(path, f"its arrays file {arrays_path.name} is missing") from None
    if hashlib.sha256(payload).hexdigest() != meta["arrays-sha256"]:
        raise _corrupt(path, f"{arrays_path.name} does not match the checksum in the sidecar "
                             f"(truncated or overwritten)")
    try:
        arrays = load(payload)
    except (SafetensorError, ValueError) as err:
        raise _corrupt(path, f"{arrays_path.name} is not a valid safetensors file ({err})") from None
    global_arrays, state = _unflatten(arrays, meta["layout"], path)
    state.meta = dict(meta.get("meta", {}))
    try:
        state.per_client_meta = {str(n): {int(c): v for c, v in by.items()}
                                 for n, by in meta.get("per-client-meta", {}).items()}
    except (AttributeError, ValueError):
        raise _corrupt(path, "'per-client-meta' is not keyed by integer client ids") from None
    return Checkpoint(round=int(meta["round"]), strategy=str(meta["strategy"]),
                      config=dict(meta["config"]), global_arrays=global_arrays, state=state,
                      info=dict(meta.get("info", {})))


def latest_checkpoint(directory: str | os.PathLike) -> Checkpoint | None:
    """The checkpoint of the highest round in ``directory``, or ``None`` if there is none.

    A round whose arrays file exists without its sidecar (a crash between the two writes) is
    not a checkpoint and is skipped. A sidecar that exists but is unusable is an error, not a
    silent fall-back to an older round: see :func:`load_checkpoint`.
    """
    rounds = checkpoint_rounds(directory)
    if not rounds:
        return None
    return load_checkpoint(Path(directory) / f"{_stem(rounds[-1])}.json")


def check_compatible(ckpt: Checkpoint, strategy: str, config: Mapping[str, object],
                     may_differ: Iterable[str] = ()) -> None:
    """Refuse to resume a checkpoint written by another strategy or run config.

    Parameters
    ----------
    ckpt : Checkpoint
        What was loaded.
    strategy : str
        The strategy of the run that wants to resume.
    config : mapping
        That run's config, kebab-case keys, JSON values.
    may_differ : iterable of str
        Keys allowed to change between the runs (e.g. the number of rounds).

    Raises
    ------
    CheckpointError
        Naming the strategy or every differing key with both values.
    """
    if ckpt.strategy != strategy:
        raise CheckpointError(f"the checkpoint of round {ckpt.round} was written by strategy "
                              f"'{ckpt.strategy}', this run uses '{strategy}'")
    allowed = set(may_differ)
    keys = (set(ckpt.config) | set(config)) - allowed
    diffs = [f"{k}: checkpoint {ckpt.config.get(k, '<unset>')!r}, now {config.get(k, '<unset>')!r}"
             for k in sorted(keys) if ckpt.config.get(k, "<unset>") != config.get(k, "<unset>")]
    if diffs:
        raise CheckpointError(f"the checkpoint of round {ckpt.round} comes from another run config "
                              f"({'; '.join(diffs)}); resume with the same settings or start afresh")
