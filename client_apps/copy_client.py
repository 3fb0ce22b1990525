"""ClientApp for the copy task: honest or contaminated, chosen by run config and node config.

Follows the FlowerTune convention, so any strategy that understands PEFT state dicts works:
the reply holds ``ArrayRecord(get_peft_model_state_dict(model))`` under ``"arrays"`` and a
MetricRecord under ``"metrics"`` with ``num-examples``, ``train-loss`` and ``partition-id``.
It also reports ``contaminated`` (ground truth for the results); the ServerApp strips that
key before any strategy sees a reply.

The base model is built or loaded from the on-disk cache on the client and never sent.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from collections.abc import Mapping

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from clair_flower.client_apps import training_cache
from clair_flower.copytask import attacks
from clair_flower.server_apps.run_config import RunConfig, base_task_config, lora_spec, model_config, task_config, train_config
from clair_flower.server_apps.run_config import attack_config as _run_attack_config
from clair_flower.copytask.model import load_base_model, wrap_lora
from clair_flower.copytask.peft_io import AdapterMismatchError, get_adapter_arrays, merge_delta, set_adapter_arrays
from clair_flower.copytask.task import NUM_SPECIAL, ClientData, encode, make_client_data
from clair_flower.copytask.training import evaluate, train_local
from clair_flower.strategies.protocol import (ARRAYS_KEY, BOTH_FACTORS, CONFIG_KEY, CONTAMINATED, FACTOR_CHOICES,
                                 MERGED_DELTA_KEY, METRICS_KEY,
                                 NUM_EXAMPLES, NUM_PARTITIONS, PARTITION_ID, SERVER_ROUND, TRAIN_FACTORS,
                                 TRAIN_LOSS, TRAIN_SECONDS, TRAIN_TOKEN_ACC, TRAIN_TOKEN_ACC_Q3, UPLOAD_FACTORS)
from clair_flower.strategies.records import from_arrayrecord, to_arrayrecord, to_metricrecord

GROUND_TRUTH_KEY = CONTAMINATED
BAD_REQUEST = 400

app = ClientApp()


@functools.lru_cache(maxsize=4)
def _config(items: tuple[tuple[str, object], ...]) -> RunConfig:
    return RunConfig.from_mapping(dict(items))


def run_config(context: Context) -> RunConfig:
    """The validated run config (parsed once per process)."""
    return _config(tuple(sorted(context.run_config.items())))


@functools.lru_cache(maxsize=2)
def _base_model(cfg: RunConfig):  # noqa: ANN202 - a transformers model
    return load_base_model(model_config(cfg), base_task_config(cfg))


def partition(context: Context) -> tuple[int, int]:
    """``partition-id`` and ``num-partitions`` from the node config (injected by the
    simulation; passed with ``--node-config`` in deployment)."""
    try:
        return int(context.node_config[PARTITION_ID]), int(context.node_config[NUM_PARTITIONS])
    except KeyError as err:
        raise ValueError(f"node config lacks {err}: start the SuperNode with "
                         f"--node-config 'partition-id=<i> num-partitions=<n>'") from None


def attack_config(cfg: RunConfig) -> attacks.AttackConfig:
    """The run's attack, with the run ``seed`` as ``run_seed``: the contaminated partitions
    are drawn from ``seed`` and ``attack-seed`` together (see
    :func:`clair_flower.copytask.attacks.contaminated_partitions`)."""
    return dataclasses.replace(_run_attack_config(cfg), run_seed=cfg.seed)


def is_contaminated(cfg: RunConfig, context: Context) -> bool:
    """Contaminated if the node config says so (deployment), else if the draw from the run
    ``seed`` and ``attack-seed`` picks its partition."""
    if CONTAMINATED in context.node_config:
        return bool(context.node_config[CONTAMINATED])
    pid, n = partition(context)
    return pid in attacks.contaminated_partitions(n, attack_config(cfg))


def model_with_adapter(cfg: RunConfig, arrays: Mapping[str, np.ndarray]):  # noqa: ANN201
    """A fresh copy of the cached base model with the received adapter loaded; arrays under
    ``merged-delta/`` (see :func:`_received_arrays`) are merged into the base layers first."""
    model = wrap_lora(copy.deepcopy(_base_model(cfg)), lora_spec(cfg), seed=cfg.seed)
    delta = {k[len(DELTA_PREFIX):]: v for k, v in arrays.items() if k.startswith(DELTA_PREFIX)}
    set_adapter_arrays(model, {k: v for k, v in arrays.items() if not k.startswith(DELTA_PREFIX)})
    if delta:
        merge_delta(model, delta)
    return model


DELTA_PREFIX = MERGED_DELTA_KEY + "/"


def _received_arrays(msg: Message) -> dict[str, np.ndarray]:
    """The adapter sent, plus the merged delta (if any) under ``merged-delta/<key>``: one
    mapping, so the training cache keys on both."""
    if ARRAYS_KEY not in msg.content.array_records:
        raise AdapterMismatchError(f"the message carries no ArrayRecord '{ARRAYS_KEY}'")
    arrays = from_arrayrecord(msg.content.array_records[ARRAYS_KEY])
    if MERGED_DELTA_KEY in msg.content.array_records:
        delta = from_arrayrecord(msg.content.array_records[MERGED_DELTA_KEY])
        arrays.update({DELTA_PREFIX + k: v for k, v in delta.items()})
    return arrays


def _config_value(msg: Message, key: str, default: object) -> object:
    config = msg.content.config_records.get(CONFIG_KEY, {})
    return config.get(key, default)


def _round(msg: Message) -> int:
    return int(_config_value(msg, SERVER_ROUND, 0))  # type: ignore[arg-type]


def _factor_choice(msg: Message, key: str) -> str:
    """``train-factors`` / ``upload-factors`` from the server: "both", "A" or "B".

    RoLoRA and FFA-LoRA train one factor with the other frozen and upload only that one.
    """
    value = str(_config_value(msg, key, BOTH_FACTORS))
    if value not in FACTOR_CHOICES:
        raise ValueError(f"config '{key}' must be 'both', 'A' or 'B', got {value!r}")
    return value


def _only_factor(state: dict[str, np.ndarray], which: str) -> dict[str, np.ndarray]:
    if which == BOTH_FACTORS:
        return state
    suffix = f".lora_{which}.weight"
    return {k: v for k, v in state.items() if k.endswith(suffix)}


def _client_data(cfg: RunConfig, context: Context, server_round: int, contaminated: bool) -> ClientData:
    pid, n = partition(context)
    acfg = attack_config(cfg)
    poison = None
    if contaminated and attacks.is_active(acfg, server_round):
        poison = attacks.data_poison(acfg, cfg.vocab_size)
    return make_client_data(task_config(cfg), pid, n, poison=poison)


def _benign_reference(cfg: RunConfig, received: Mapping[str, np.ndarray], context: Context,
                      server_round: int, k: int = 3) -> list[dict[str, np.ndarray]]:
    """Adapters of a few benign partitions, trained from the received adapter.

    ALIE and IPM assume the attacker knows the benign updates' statistics (the omniscient
    colluder of the literature); the copy task's data are deterministic by seed, so the
    attacker regenerates benign partitions' data and trains them itself.
    """
    _, n = partition(context)
    bad = attacks.contaminated_partitions(n, attack_config(cfg))
    benign = [p for p in range(n) if p not in bad][:k]
    out = []
    for p in benign:
        data = make_client_data(task_config(cfg), p, n)
        state, _ = trained_adapter(cfg, received, data, partition=p, num_partitions=n, server_round=server_round,
                                   trainable=BOTH_FACTORS, contaminated=False)
        out.append(state)
    return out


def trained_adapter(cfg: RunConfig, received: Mapping[str, np.ndarray], data: ClientData, *, partition: int,
                    num_partitions: int, server_round: int, trainable: str, contaminated: bool,
                    model=None) -> tuple[dict[str, np.ndarray], dict[str, float]]:  # noqa: ANN001
    """Local training from ``received``: (adapter state, stats), through the grid's training
    cache when ``train-cache-dir`` is set (:mod:`.training_cache`). ``model``: the received
    adapter already loaded (built here on a cache miss when not given)."""
    key = None
    if cfg.train_cache_dir:
        key = training_cache.training_key(cfg, received, partition=partition, num_partitions=num_partitions,
                                          server_round=server_round, trainable=trainable, contaminated=contaminated)
        hit = training_cache.load(cfg.train_cache_dir, key)
        if hit is not None:
            return hit
    model = model if model is not None else model_with_adapter(cfg, received)
    stats = train_local(model, data, train_config(cfg), seed=_train_seed(cfg, partition, server_round),
                        trainable=trainable)
    state = get_adapter_arrays(model)
    if key is not None:
        training_cache.store(cfg.train_cache_dir, key, state, stats)
    return state, stats


def _train_seed(cfg: RunConfig, pid: int, server_round: int) -> int:
    return cfg.seed * 1_000_003 + pid * 1009 + server_round


def _error_reply(msg: Message, err: Exception) -> Message:
    return Message(Error(code=BAD_REQUEST, reason=f"{type(err).__name__}: {err}"), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the adapter sent, fine-tune it locally, reply with the PEFT state dict."""
    cfg = run_config(context)
    try:
        received = _received_arrays(msg)
        model = model_with_adapter(cfg, received)  # a mismatched adapter is refused before any training
        trainable, upload = _factor_choice(msg, TRAIN_FACTORS), _factor_choice(msg, UPLOAD_FACTORS)
    except (AdapterMismatchError, ValueError) as err:
        return _error_reply(msg, err)
    server_round = _round(msg)
    pid, n = partition(context)
    contaminated = is_contaminated(cfg, context)
    data = _client_data(cfg, context, server_round, contaminated)
    t0 = time.perf_counter()
    state, stats = trained_adapter(cfg, received, data, partition=pid, num_partitions=n, server_round=server_round,
                                   trainable=trainable, contaminated=contaminated, model=model)
    train_seconds = time.perf_counter() - t0
    acfg = attack_config(cfg)
    if contaminated and acfg.name in attacks.MODEL_ATTACKS and attacks.is_active(acfg, server_round):
        reference = (_benign_reference(cfg, received, context, server_round)
                     if acfg.name in attacks.NEEDS_REFERENCE else None)
        adapter = {k: v for k, v in received.items() if not k.startswith(DELTA_PREFIX)}
        state = attacks.poison_update(acfg, state, adapter, server_round, benign_reference=reference,
                                      num_clients=n,
                                      num_malicious=len(attacks.contaminated_partitions(n, acfg)))
    metrics = {NUM_EXAMPLES: int(stats["num-examples"]), TRAIN_LOSS: stats["train-loss"],
               TRAIN_SECONDS: train_seconds, PARTITION_ID: pid, GROUND_TRUTH_KEY: int(contaminated),
               TRAIN_TOKEN_ACC: stats["train-token-acc"], TRAIN_TOKEN_ACC_Q3: stats["train-token-acc-q3"]}
    return Message(RecordDict({ARRAYS_KEY: to_arrayrecord(_only_factor(state, upload)),
                               METRICS_KEY: to_metricrecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate_adapter(msg: Message, context: Context) -> Message:
    """Evaluate the adapter sent on this client's own held-out data."""
    cfg = run_config(context)
    try:
        model = model_with_adapter(cfg, _received_arrays(msg))
    except (AdapterMismatchError, ValueError) as err:
        return _error_reply(msg, err)
    pid, n = partition(context)
    contaminated = is_contaminated(cfg, context)
    data = make_client_data(task_config(cfg), pid, n)
    metrics: dict[str, object] = dict(evaluate(model, data.test_inputs, data.test_labels))
    acfg = attack_config(cfg)
    if acfg.name == "backdoor":
        metrics["backdoor-asr"] = _backdoor_success(cfg, model, data)
    metrics.update({NUM_EXAMPLES: int(data.test_inputs.shape[0]), PARTITION_ID: pid,
                    GROUND_TRUTH_KEY: int(contaminated)})
    return Message(RecordDict({METRICS_KEY: to_metricrecord(metrics)}), reply_to=msg)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds.

    Node ids are new in every run; a resumed ServerApp asks every node this once, before its
    first round, to hand each node the per-client state its partition left in the checkpoint.
    """
    try:
        pid, n = partition(context)
    except ValueError as err:
        return _error_reply(msg, err)
    return Message(RecordDict({METRICS_KEY: to_metricrecord({PARTITION_ID: pid, NUM_PARTITIONS: n})}),
                   reply_to=msg)


def _backdoor_success(cfg: RunConfig, model, data: ClientData) -> float:  # noqa: ANN001
    """Exact-sequence rate at which triggered test inputs produce the backdoor target."""
    x = data.test_inputs.numpy()
    # Content tokens of the clean test inputs: between BOS (position 0) and SEP.
    xs = x[:, 1:1 + data.seq_len] - NUM_SPECIAL
    xt, yt = attacks.backdoor_test_set(xs, attack_config(cfg), cfg.vocab_size)
    inputs, labels = encode(xt, yt, cfg.max_len)
    return float(evaluate(model, inputs, labels)["exact-acc"])
