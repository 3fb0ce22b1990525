"""A content-addressed cache of local training, shared by the cells of an experiment grid.

In the first round every strategy sends the same initial adapter, and in the one-shot protocol
that round is all the training there is: ten strategies compared on one seed would train the
same ten clients ten times, bit for bit the same. The cache keys a training by everything it
reads (the received adapter's bytes, every run-config key a client's training depends on, the
partition, the round and the factors trained) and stores the trained adapter before any model
poisoning, so a cell that hits the cache computes exactly what it would have trained.

It is off unless ``train-cache-dir`` is set; the experiment runner sets it per grid. Entries are
written atomically (a parallel cell never reads half a file) and never invalidated: a code change
that alters training needs a new directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from clair_flower.server_apps.run_config import RunConfig

#: Run-config keys that only the server reads: two cells that differ only in these train alike.
SERVER_ONLY_KEYS = frozenset({
    "strategy", "protocol", "num-server-rounds", "output-dir", "resume", "round-timeout", "fraction-train",
    "fraction-evaluate", "min-nodes", "max-norm-ratio", "num-malicious", "train-cache-dir",
    "clair-rank", "clair-solver", "clair-c", "clair-policy", "clair-no-structure", "clair-downlink",
})
#: Keys that change only a contaminated client's training (its poisoned data): a benign client
#: trains alike under every attack, so its entries are shared across the attack table too.
ATTACK_KEYS = frozenset({"attack", "attack-fraction", "attack-start-round", "attack-strength", "attack-seed"})
STATS_KEY = "__stats__"


def training_key(cfg: RunConfig, received: Mapping[str, np.ndarray], *, partition: int, num_partitions: int,
                 server_round: int, trainable: str, contaminated: bool) -> str:
    """SHA-256 of everything a client's local training reads."""
    h = hashlib.sha256()
    ignored = SERVER_ONLY_KEYS if contaminated else SERVER_ONLY_KEYS | ATTACK_KEYS
    client_config = {k: v for k, v in cfg.to_mapping().items() if k not in ignored}
    h.update(json.dumps([client_config, partition, num_partitions, server_round, trainable, contaminated],
                        sort_keys=True, default=str).encode())
    for name in sorted(received):
        arr = np.ascontiguousarray(received[name])
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def load(directory: str, key: str) -> tuple[dict[str, np.ndarray], dict[str, float]] | None:
    """The cached (adapter state, training stats), or None on a miss."""
    path = Path(directory) / f"{key}.npz"
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as npz:
        state = {k: npz[k] for k in npz.files if k != STATS_KEY}
        stats = json.loads(str(npz[STATS_KEY]))
    return state, stats


def store(directory: str, key: str, state: Mapping[str, np.ndarray], stats: Mapping[str, float]) -> None:
    """Write one entry atomically (temporary file, then rename)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **dict(state), **{STATS_KEY: np.array(json.dumps(dict(stats)))})
        os.replace(tmp, Path(directory) / f"{key}.npz")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
