"""The reply screen: every check of a client reply, so that one bad client never takes a round down.

Flower's FedAvg family ends the whole ServerApp with ``InconsistentMessageReplies`` when one
reply lacks a key, and ``Array.numpy()`` raises on bytes it cannot load. :class:`ReplyScreen`
checks every reply first and hands on only the usable ones as :class:`~clair_flower.strategies.uploads.Upload`
objects, each rejection logged with its reason.

Everything a reply carries is decoded *here*, per client, and nowhere else: the npy header of
each array is read and checked (stype, format version, dtype, shape, the declared ``Array``
metadata, the exact byte length) before any buffer is touched, so a payload that declares a
terabyte is rejected without allocating it. Any exception while screening one reply, expected
or not, rejects that client only, with a reason naming the key where one is known.

Checks, in order: duplicate replies of one node; error reply; MetricRecord and its scalar,
finite, positive weight; ArrayRecord; keys; per array: decode, dtype, shape, NaN/Inf, float32
range; LoRA rank pairs; across clients: absurd norms.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore import log

from clair_flower.lora import LORA_A_SUFFIX, LORA_B_SUFFIX
from clair_flower.strategies.protocol import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES
from clair_flower.strategies.uploads import ScreenReport, Upload

Template = Mapping[str, tuple[int, ...]]

#: The only serialisation ``Array.numpy()`` understands (``flwr.common.constant.SType.NUMPY``).
NUMPY_STYPE = "numpy.ndarray"


class UpdateRejected(ValueError):
    """An upload that cannot be used this round; the message says why."""


def template_of(state: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a reference state dict (the adapter the server sent)."""
    return {k: tuple(np.shape(v)) for k, v in state.items()}


# -- per-array checks ------------------------------------------------------------------------
def _check_keys(keys: Iterable[str], template: Template) -> None:
    keys = set(keys)
    missing = sorted(set(template) - keys)
    extra = sorted(keys - set(template))
    if missing:
        raise UpdateRejected(f"missing LoRA keys: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    if extra:
        raise UpdateRejected(f"unexpected keys: {extra[:3]}{' ...' if len(extra) > 3 else ''}")


def _check_dtype(key: str, dtype: np.dtype) -> None:
    if dtype.kind != "f":
        raise UpdateRejected(f"{key}: dtype {dtype}, expected a floating dtype")


def _check_shape(key: str, got: tuple[int, ...], want: tuple[int, ...], any_rank: bool) -> None:
    if got == want:
        return
    if any_rank and len(got) == 2 and len(want) == 2:
        # A is (r, in), B is (out, r): the feature axis must match, the rank may differ.
        if key.endswith(LORA_A_SUFFIX) and got[1] == want[1] and got[0] > 0:
            return
        if key.endswith(LORA_B_SUFFIX) and got[0] == want[0] and got[1] > 0:
            return
    raise UpdateRejected(f"{key}: shape {got}, expected {want}")


def _check_values(key: str, arr: np.ndarray) -> np.ndarray:
    """NaN/Inf check, then the float32 cast the strategies work in (which must stay finite)."""
    if not np.all(np.isfinite(arr)):
        raise UpdateRejected(f"{key}: contains NaN or Inf")
    out = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(out)):
        raise UpdateRejected(f"{key}: values beyond the float32 range (max |x| {float(np.max(np.abs(arr))):.3g})")
    return out


def _check_rank_pairs(state: Mapping[str, np.ndarray]) -> None:
    for key, a in state.items():
        if key.endswith(LORA_A_SUFFIX):
            b = state.get(key[: -len(LORA_A_SUFFIX)] + LORA_B_SUFFIX)
            if b is not None and np.shape(b)[1] != np.shape(a)[0]:
                raise UpdateRejected(f"{key}: rank {np.shape(a)[0]} but its lora_B has rank {np.shape(b)[1]}")


def decode_array(key: str, array: Array, want: tuple[int, ...] | None = None, *,
                 any_rank: bool = False) -> np.ndarray:
    """``array`` as a numpy array, read only after its header and length are checked.

    Raises :class:`UpdateRejected` naming ``key`` for: an stype other than numpy's, bytes
    that are not an npy payload, a non-floating dtype, a shape other than ``want`` (the rank
    may differ under ``any_rank``), ``Array.dtype``/``Array.shape`` that disagree with the
    bytes, and a data length other than the header's shape and dtype need.
    """
    if array.stype != NUMPY_STYPE:
        raise UpdateRejected(f"{key}: cannot decode array: stype {array.stype!r}, expected {NUMPY_STYPE!r}")
    data = array.data
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise UpdateRejected(f"{key}: cannot decode array: data is {type(data).__name__}, not bytes")
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ValueError(f"npy format version {version} is not supported")
    except Exception as err:  # noqa: BLE001 - whatever numpy raises on these bytes
        raise UpdateRejected(f"{key}: cannot decode array: {type(err).__name__}: {err}") from None
    shape = tuple(int(s) for s in shape)
    _check_dtype(key, dtype)
    if want is not None:
        _check_shape(key, shape, tuple(want), any_rank)
    if str(array.dtype) != str(dtype) or tuple(array.shape) != shape:
        raise UpdateRejected(f"{key}: cannot decode array: declared dtype {array.dtype} shape "
                             f"{tuple(array.shape)}, but the data hold {dtype} {shape}")
    offset = fp.tell()
    need = math.prod(shape) * dtype.itemsize
    if len(data) - offset != need:
        raise UpdateRejected(f"{key}: cannot decode array: {len(data) - offset} data bytes, "
                             f"expected {need} for {dtype} {shape}")
    try:
        flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
        return np.array(flat.reshape(shape, order="F" if fortran else "C"), order="C")
    except Exception as err:  # noqa: BLE001
        raise UpdateRejected(f"{key}: cannot decode array: {type(err).__name__}: {err}") from None


def declared_shapes(record: ArrayRecord, template: Template, *, any_rank: bool = False) -> dict[str, tuple[int, ...]]:
    """Key -> shape an ArrayRecord *declares*, checked against ``template``; nothing is decoded.

    For what only the shapes tell (a client's LoRA rank per module): the keys must be the
    template's, each shape must match it (the rank may differ under ``any_rank``) and every
    ``lora_A``/``lora_B`` pair must agree on its rank. Raises :class:`UpdateRejected`.
    """
    _check_keys(record.keys(), template)
    shapes: dict[str, tuple[int, ...]] = {}
    for key, want in template.items():
        got = tuple(int(n) for n in record[key].shape)
        _check_shape(key, got, tuple(want), any_rank)
        shapes[key] = got
    for key, a in shapes.items():
        if key.endswith(LORA_A_SUFFIX):
            b = shapes.get(key[: -len(LORA_A_SUFFIX)] + LORA_B_SUFFIX)
            if b is not None and b[1] != a[0]:
                raise UpdateRejected(f"{key}: rank {a[0]} but its lora_B has rank {b[1]}")
    return shapes


def decode_state(record: ArrayRecord, template: Template, *, any_rank: bool = False) -> dict[str, np.ndarray]:
    """Decode and check an uploaded ArrayRecord against the expected keys and shapes.

    Returns the state dict as float32; raises :class:`UpdateRejected` with the first reason.
    """
    _check_keys(record.keys(), template)
    return check_state({k: decode_array(k, record[k], tuple(want), any_rank=any_rank)
                        for k, want in template.items()}, template, any_rank=any_rank)


def check_state(
    state: Mapping[str, np.ndarray], template: Template, *, any_rank: bool = False
) -> dict[str, np.ndarray]:
    """Validate an already decoded upload against the expected keys and shapes; return it as float32.

    ``any_rank`` lets a client use its own LoRA rank (CLAIR handles heterogeneous ranks);
    the feature dimensions must still match the model.
    """
    _check_keys(state.keys(), template)
    out: dict[str, np.ndarray] = {}
    for key, want in template.items():
        arr = np.asarray(state[key])
        _check_dtype(key, arr.dtype)
        _check_shape(key, tuple(arr.shape), tuple(want), any_rank)
        out[key] = _check_values(key, arr)
    if any_rank:
        _check_rank_pairs(out)
    return out


# -- across clients --------------------------------------------------------------------------
def state_norm(state: Mapping[str, np.ndarray]) -> float:
    """Euclidean norm of all arrays together, in float64 so large uploads cannot overflow."""
    return float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in state.values())))


def absurd_norms(norms: Sequence[float], ratio: float) -> list[int]:
    """Indices whose norm exceeds ``ratio`` times the median of the others.

    Meant as a sanity bound (``ratio`` of 100 or more), not as a robust aggregator: it only
    removes uploads no honest client could have produced. Needs at least three uploads.
    """
    if len(norms) < 3 or ratio <= 0:
        return []
    arr = np.asarray(norms, dtype=np.float64)
    out = []
    for i, n in enumerate(arr):
        med = float(np.median(np.delete(arr, i)))
        if med > 0 and n > ratio * med:
            out.append(i)
    return out


# -- records ---------------------------------------------------------------------------------
def _metrics_of(content: RecordDict, metrics_key: str) -> MetricRecord:
    if metrics_key in content.metric_records:
        return content.metric_records[metrics_key]
    if len(content.metric_records) == 1:
        return next(iter(content.metric_records.values()))
    raise UpdateRejected(f"no MetricRecord '{metrics_key}' in the reply")


def _weight(metrics: MetricRecord, key: str) -> float:
    value = metrics.get(key)
    if isinstance(value, list) or value is None:
        raise UpdateRejected(f"MetricRecord lacks a scalar '{key}'")
    if not np.isfinite(value) or value <= 0:
        raise UpdateRejected(f"'{key}' must be positive, got {value}")
    return float(value)


def _arrays_of(content: RecordDict, arrays_key: str) -> ArrayRecord:
    if arrays_key in content.array_records:
        return content.array_records[arrays_key]
    raise UpdateRejected(f"no ArrayRecord '{arrays_key}' in the reply")


def _duplicates(replies: list[Message]) -> tuple[dict[int, int], int]:
    """Nodes with more than one reply (node -> count), and the number of surplus replies."""
    counts = Counter(int(m.metadata.src_node_id) for m in replies)
    dup = {n: c for n, c in counts.items() if c > 1}
    return dup, sum(c - 1 for c in dup.values())


def _reason(err: Exception) -> str:
    return str(err) if isinstance(err, UpdateRejected) else f"cannot screen reply: {type(err).__name__}: {err}"


class ReplyScreen:
    """Validate train and evaluate replies against the adapter the server sent.

    Parameters
    ----------
    any_rank : bool
        Accept LoRA factors of a different rank than the server's (CLAIR handles
        heterogeneous ranks; FedAvg cannot average them).
    max_norm_ratio : float
        Reject an upload whose norm exceeds this multiple of the median of the others.
        A sanity bound against absurd uploads (overflowed or scaled by 1e6), not a defence.
    arrayrecord_key, metricrecord_key : str
        Names of the ArrayRecord and MetricRecord in a reply (FlowerTune convention:
        ``"arrays"``, ``"metrics"``). A reply with a single MetricRecord under another name
        is read too, as Flower's FedAvg does.
    weighted_by_key : str
        Scalar metric every reply must carry, finite and positive: the aggregation weight.

    Duplicate replies
    -----------------
    A node that sends more than one reply in a round is rejected for that round, all its
    replies together, whatever they hold and in whatever order they arrive: one rule that
    does not depend on arrival order (which the runtime does not fix). It is logged with
    the node id (WARNING) and counted in the round's ``duplicate-replies`` metric.
    """

    def __init__(self, *, any_rank: bool = False, max_norm_ratio: float = 1e3,
                 arrayrecord_key: str = ARRAYS_KEY, metricrecord_key: str = METRICS_KEY,
                 weighted_by_key: str = NUM_EXAMPLES) -> None:
        self.any_rank = any_rank
        self.max_norm_ratio = max_norm_ratio
        self.arrayrecord_key = arrayrecord_key
        self.metricrecord_key = metricrecord_key
        self.weighted_by_key = weighted_by_key

    @property
    def arrays_key(self) -> str:
        """Former name of :attr:`arrayrecord_key` (kept for callers of the old API)."""
        return self.arrayrecord_key

    @property
    def metrics_key(self) -> str:
        """Former name of :attr:`metricrecord_key` (kept for callers of the old API)."""
        return self.metricrecord_key

    def _upload(self, msg: Message, template: Template) -> Upload:
        if msg.has_error():
            raise UpdateRejected(f"error reply: {msg.error.reason}")
        if not msg.has_content():
            raise UpdateRejected("empty reply")
        content = msg.content
        metrics = _metrics_of(content, self.metricrecord_key)
        n = _weight(metrics, self.weighted_by_key)
        state = decode_state(_arrays_of(content, self.arrayrecord_key), template, any_rank=self.any_rank)
        return Upload(int(msg.metadata.src_node_id), state, n, dict(metrics))

    def train(self, replies: Iterable[Message], template: Template) -> ScreenReport:
        """Screen train replies against ``template`` (key -> shape of what the server sent)."""
        replies = list(replies)
        dup, surplus = _duplicates(replies)
        report = ScreenReport(duplicates=surplus)
        for nid, count in sorted(dup.items()):
            report.rejected[nid] = f"{count} replies in one round (a node's duplicates are all rejected)"
        for msg in replies:
            nid = int(msg.metadata.src_node_id)
            if nid in dup:
                continue
            try:
                report.accepted.append(self._upload(msg, template))
            except Exception as err:  # noqa: BLE001 - any failure costs this client only
                report.rejected[nid] = _reason(err)
        norms = [state_norm(u.state) for u in report.accepted]
        for i in reversed(absurd_norms(norms, self.max_norm_ratio)):
            up = report.accepted.pop(i)
            report.rejected[up.node_id] = f"update norm {norms[i]:.3g} is over {self.max_norm_ratio:g}x the median"
        for nid, reason in report.rejected.items():
            log(WARNING, "Rejected train reply from node %d: %s", nid, reason)
        return report

    def evaluate(self, replies: Iterable[Message]) -> tuple[list[tuple[int, dict[str, object]]], dict[int, str]]:
        """Screen evaluate replies: each needs a MetricRecord with a positive weight.

        Duplicates follow the same rule as in :meth:`train`.
        """
        replies = list(replies)
        dup, _ = _duplicates(replies)
        ok: list[tuple[int, dict[str, object]]] = []
        bad: dict[int, str] = {nid: f"{c} replies in one round (a node's duplicates are all rejected)"
                               for nid, c in sorted(dup.items())}
        for msg in replies:
            nid = int(msg.metadata.src_node_id)
            if nid in dup:
                continue
            try:
                if msg.has_error():
                    raise UpdateRejected(f"error reply: {msg.error.reason}")
                metrics = _metrics_of(msg.content, self.metricrecord_key)
                _weight(metrics, self.weighted_by_key)
                ok.append((nid, dict(metrics)))
            except Exception as err:  # noqa: BLE001
                bad[nid] = _reason(err)
        for nid, reason in bad.items():
            log(WARNING, "Rejected evaluate reply from node %d: %s", nid, reason)
        return ok, bad
