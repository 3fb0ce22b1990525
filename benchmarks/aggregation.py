"""Aggregation benchmark: CLAIR's server step against Flower's FedAvg, MultiKrum and FedMedian.

Run ``python benchmarks/aggregation.py`` (``--skip-llm`` for the small size only, ``--quick`` for a
reduced LLM part). The uploads are built once per size and wrapped in real Flower reply
``Message``\\ s (one ``ArrayRecord`` of ``<module>.lora_A`` / ``<module>.lora_B`` arrays and a
``MetricRecord`` with ``num-examples`` per client); every method then runs on those same
Messages, interleaved (CLAIR, FedAvg, MultiKrum, FedMedian, CLAIR, ...), so a change of machine
load hits all of them alike.

* Flower: ``flwr.serverapp.strategy`` ``FedAvg``, ``MultiKrum`` (``f`` = 10% of the clients, at
  least 1, selecting ``N - f``) and ``FedMedian``, each timed on ``aggregate_train``.
* CLAIR: the server step as a CLAIR server runs it: the Messages' arrays read as factors
  (zero-copy views of the received bytes), :func:`clair_flower.clair.run_clair`, then every
  client's refined adapter serialised into its reply ``ArrayRecord`` one client at a time.

Sizes: ``small`` is the copy task's (10 clients, GPT-2 2 layers x width 128: 8 LoRA modules of
384x128, 128x128, 512x128 and 128x512 at rank 4, CLAIR's default settings); ``small_structured``
the same with a shared subspace and a contaminated client (the path stops early there). The
``small`` updates share no subspace, as the demo's rounds decided by the fallback rule; that is
the slow case, since every module then runs its own lambda path. ``llm`` is the 7B shape of
``benchmarks/clair_solver.py`` (N = 100, rank 16, 64 modules of 4096 x 4096, float32, CLAIR with
sampled pairs of degree 4). Peak RSS per method is the process's high-water mark reset before
the method (``/proc/self/clear_refs``), so it includes the Messages held (the uploads' bytes).

``clair_threaded`` (unless ``--no-slow``) is CLAIR's step on the threaded path it had before the
lockstep solves (``fit.LOCKSTEP = False``), timed beside it with its flags compared;
``--flowertune`` adds 30 clients x 16 modules at rank 4 and 10 clients x 4 modules at rank 32
(the latter runs for minutes per repetition: its lambda path's late points need hundreds of
iterations each, README). Every method's CPU seconds (``time.process_time``) are kept beside
its wall seconds: on this shared machine they are the steadier figure.

Prints min / median / max over the repetitions per method and size and, as the LAST line, one
JSON object: ``small.clair_over_fedavg`` (median over median), ``small.clair_share_of_round``
(CLAIR's median over the demo's round wall time, ``--round-seconds``: 9 s, the default demo's
round as measured in issue #21, not re-measured here), ``llm.clair_over_multikrum``,
``llm.clair_rss_over_uploads`` (CLAIR's peak RSS, the Messages included, over the uploads'
bytes; ``_net`` subtracts the RSS at start) and every raw time. A benchmark, not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedAvg, FedMedian, MultiKrum  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402  (private API: flwr pinned to 1.41.*)

from clair_flower.clair import ClairConfig, fit, run_clair  # noqa: E402
from clair_flower.clair.synthetic import make_large_factors  # noqa: E402
from clair_flower.lora import LoraFactors  # noqa: E402
from clair_solver import seven_b_uploads  # noqa: E402

COPY_TASK_MODULES: dict[str, tuple[int, int]] = {
    "attn.c_attn": (384, 128), "attn.c_proj": (128, 128), "mlp.c_fc": (512, 128), "mlp.c_proj": (128, 512)}
"""LoRA targets of the copy task's GPT-2 block (``n_embd = 128``) as ``(out, in)``: ``B`` is
``out x r``, ``A`` is ``r x in``."""

FLOWERTUNE_SIZES: dict[str, tuple[int, int, int]] = {"ft_30x16_r4": (30, 4, 4), "ft_10x4_r32": (10, 1, 32)}
"""``--flowertune`` sizes as ``(clients, copy-task layers (4 modules each), rank)``: issue #21's
range is 10 to 30 clients, 4 to 16 small modules, ranks 4 to 32."""

DEMO_ROUND_SECONDS = 9.0
"""Wall time of one round of the default demo (issue #21: CLAIR took 1.1-1.4 s of a 9 s round)."""


def small_uploads(n: int = 10, rank: int = 4, layers: int = 2, structured: bool = False, seed: int = 0
                  ) -> dict[int, dict[str, LoraFactors]]:
    """Copy-task-shaped uploads: with ``structured``, benign clients share a rank-2 subspace
    per module and 10% are contaminated; without, every client's factors are independent (the
    shared part drowned by noise 10x its size), as in the demo's rounds without structure."""
    updates: dict[int, dict[str, LoraFactors]] = {k: {} for k in range(n)}
    bad = None
    for layer in range(layers):
        for j, (name, shape) in enumerate(COPY_TASK_MODULES.items()):
            ups, _, bad = make_large_factors(n, shape, rank, shared_rank=min(2, rank - 1),
                                             noise=0.1 if structured else 10.0, seed=seed + 10 * layer + j,
                                             contaminated=bad if structured else frozenset())
            for k, f in ups.items():
                updates[k][f"h.{layer}.{name}"] = f
    return updates


def as_replies(updates: dict[int, dict[str, LoraFactors]]) -> list[Message]:
    """One Flower train reply per client: its factors (scaling folded into ``B``) and
    ``num-examples``; the instruction it answers is built alongside, as a ServerApp would get."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # as server_apps/inprocess.py
    replies = []
    for k, mods in updates.items():
        arrays = ArrayRecord({f"{m}.{part}": Array(np.ascontiguousarray(a)) for m, f in mods.items()
                              for part, a in (("lora_A", f.A), ("lora_B", (f.B * np.float32(f.scaling)).astype(f.B.dtype)))})
        instruction = Message(RecordDict({}), dst_node_id=k + 1, message_type="train", group_id="1")
        replies.append(Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 32})}),
                               reply_to=instruction))
    return replies


def fresh(replies: list[Message]) -> list[Message]:
    """New Messages sharing the same ``Array`` objects (no data copied): FedMedian pops the
    arrays out of the records it aggregates, so every method gets its own records."""
    out = []
    for msg in replies:
        instruction = Message(RecordDict({}), dst_node_id=msg.metadata.src_node_id, message_type="train", group_id="1")
        content = RecordDict({"arrays": ArrayRecord(dict(msg.content["arrays"].items())),
                              "metrics": MetricRecord(dict(msg.content["metrics"].items()))})
        out.append(Message(content, reply_to=instruction))
    return out


def array_view(arr: Array) -> np.ndarray:
    """The array in a received ``Array`` without a copy (read-only view of its ``.npy`` bytes)."""
    buf = io.BytesIO(arr.data)
    version = np.lib.format.read_magic(buf)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(buf)
    out = np.frombuffer(arr.data, dtype=dtype, count=int(np.prod(shape)), offset=buf.tell())
    return out.reshape(shape, order="F" if fortran else "C")


def clair_step(replies: list[Message], cfg: ClairConfig, lockstep: bool = True) -> dict:
    """CLAIR as a server runs it: factors from the Messages, ``run_clair``, every client's
    refined adapter serialised into an ``ArrayRecord`` (one client at a time, then dropped).
    ``lockstep=False`` runs the modules' paths on threads, as before issue #21's lockstep."""
    updates: dict[int, dict[str, LoraFactors]] = {}
    for msg in replies:
        rec = msg.content["arrays"]
        names = sorted({key.rsplit(".", 1)[0] for key in rec})
        updates[msg.metadata.src_node_id] = {
            m: LoraFactors(B=array_view(rec[f"{m}.lora_B"]), A=array_view(rec[f"{m}.lora_A"]), scaling=1.0)
            for m in names}
    fit.LOCKSTEP = lockstep
    try:
        res = run_clair(updates, cfg)
    finally:
        fit.LOCKSTEP = True
    for nid in sorted(res.clients):
        out = ArrayRecord({f"{m}.{part}": Array(np.ascontiguousarray(a, dtype=np.float32))
                           for m, f in res.clients[nid].refined.items()
                           for part, a in (("lora_A", f.A), ("lora_B", f.B * np.float32(f.scaling or 1.0)))})
        del out
    return {"decision": res.decision, "flagged": sorted(int(c) for c in res.flagged),
            "run_clair_seconds": float(res.diagnostics["seconds"])}


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss(field: str = "VmHWM") -> int:
    """The process's peak (``VmHWM``) or current (``VmRSS``) resident set, bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


START_RSS = _peak_rss("VmRSS")
"""Resident set before any upload exists (interpreter, numpy, torch, flwr): subtracted in the
``net`` memory ratio, which is what matters at small sizes where it dominates."""


def interleaved(methods: dict[str, Callable[[list[Message]], object]], replies: list[Message], reps: int
                ) -> dict[str, dict]:
    """Every method once per repetition, in turn, on its own shallow copy of the replies (made
    before the clock starts); wall seconds and peak RSS per run."""
    out: dict[str, dict] = {name: {"seconds": [], "cpu_seconds": [], "peak_rss_bytes": []} for name in methods}
    for _ in range(reps):
        for name, fn in methods.items():
            mine = fresh(replies)
            reset = _reset_peak()
            t0, c0 = time.perf_counter(), time.process_time()
            info = fn(mine)
            out[name]["seconds"].append(time.perf_counter() - t0)
            out[name]["cpu_seconds"].append(time.process_time() - c0)
            out[name]["peak_rss_bytes"].append(_peak_rss() if reset else None)
            print(f"    {name} {out[name]['seconds'][-1]:.3f} s (CPU {out[name]['cpu_seconds'][-1]:.3f} s)", flush=True)
            if isinstance(info, dict):
                out[name]["last"] = info
            del mine
    for name, r in out.items():
        s = r["seconds"]
        r.update(min=min(s), median=statistics.median(s), max=max(s), cpu_median=statistics.median(r["cpu_seconds"]))
        print(f"  {name:10s} min {min(s):8.3f}  median {r['median']:8.3f}  max {max(s):8.3f} s  CPU median {r['cpu_median']:8.3f} s"
              + (f"  peak RSS {max(r['peak_rss_bytes']) / 1e9:.2f} GB" if r["peak_rss_bytes"][0] else ""))
    return out


def flower_methods(n: int, f: int) -> dict[str, Callable[[list[Message]], object]]:
    """Flower's strategies' ``aggregate_train`` on ``n`` replies (MultiKrum with ``f`` attackers)."""
    fedavg, median = FedAvg(), FedMedian()
    mkrum = MultiKrum(num_malicious_nodes=f, num_nodes_to_select=n - f)
    return {"fedavg": lambda r: fedavg.aggregate_train(1, r) and None,
            "multikrum": lambda r: mkrum.aggregate_train(1, r) and None,
            "fedmedian": lambda r: median.aggregate_train(1, r) and None}


def run_size(label: str, updates: dict, cfg: ClairConfig, reps: int, slow: bool = False) -> dict:
    """Messages from ``updates`` (then dropped), and the interleaved timings on them; with
    ``slow``, CLAIR's threaded path (``fit.LOCKSTEP = False``) as one more method."""
    t0 = time.perf_counter()
    n = len(updates)
    upload_bytes = sum(f.A.nbytes + f.B.nbytes for mods in updates.values() for f in mods.values())
    replies = as_replies(updates)
    updates.clear()
    build = time.perf_counter() - t0
    print(f"{label}: {n} clients, {upload_bytes / 1e6:.1f} MB of uploads (Messages built in {build:.1f} s)")
    methods = {"clair": lambda r: clair_step(r, cfg)}
    if slow:
        methods["clair_threaded"] = lambda r: clair_step(r, cfg, lockstep=False)
    res = interleaved({**methods, **flower_methods(n, max(1, n // 10))}, replies, reps)
    slow_ratio = {"clair_threaded_over_fedavg": res["clair_threaded"]["median"] / res["fedavg"]["median"],
                  "clair_threaded_over_clair_cpu": res["clair_threaded"]["cpu_median"] / res["clair"]["cpu_median"],
                  "clair_threaded_same_flags": res["clair_threaded"]["last"]["flagged"] == res["clair"]["last"]["flagged"]
                  } if slow else {}
    return {"n_clients": n, "upload_bytes": upload_bytes, "build_seconds": build, "methods": res, **slow_ratio,
            "clair_over_fedavg": res["clair"]["median"] / res["fedavg"]["median"],
            "clair_over_fedavg_cpu": res["clair"]["cpu_median"] / res["fedavg"]["cpu_median"],
            "clair_over_multikrum": res["clair"]["median"] / res["multikrum"]["median"],
            "clair_over_fedmedian": res["clair"]["median"] / res["fedmedian"]["median"],
            "clair_rss_over_uploads": (max(res["clair"]["peak_rss_bytes"]) / upload_bytes
                                       if res["clair"]["peak_rss_bytes"][0] else None),
            "clair_rss_over_uploads_net": ((max(res["clair"]["peak_rss_bytes"]) - START_RSS) / upload_bytes
                                           if res["clair"]["peak_rss_bytes"][0] else None),
            "start_rss_bytes": START_RSS}


def scaling(ns: tuple[int, ...] = (10, 30, 100, 300), module_counts: tuple[int, ...] = (1, 2, 4, 8, 16),
            shape: tuple[int, int] = (256, 256), rank: int = 4, n_for_modules: int = 30) -> dict:
    """``run_clair`` seconds against the number of clients (one module) and of modules
    (``n_for_modules`` clients), sampled pairs of the default degree ``2 ceil(log2 N)``, uploads
    with a shared subspace (the first module's ``c`` is shared); per client per module too,
    and the two parts the module reports: the reduction (Grams, step 1) and the rest."""
    cfg = ClairConfig(pairs="sampled")

    def one(n: int, mods: int) -> dict:
        updates: dict[int, dict[str, LoraFactors]] = {k: {} for k in range(n)}
        bad = None
        for m in range(mods):
            ups, _, bad = make_large_factors(n, shape, rank, shared_rank=2, seed=7 + m, contaminated=bad)
            for k, f in ups.items():
                updates[k][f"m{m:02d}"] = f
        run_clair(updates, cfg) if n <= 30 else None  # warm the LAPACK workspaces once
        t0, c0 = time.perf_counter(), time.process_time()
        res = run_clair(updates, cfg)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        reduce = sum(float(r.diagnostics["reduce_seconds"]) for r in res.modules.values())
        row = {"n_clients": n, "modules": mods, "seconds": wall, "cpu_seconds": cpu,
               "ms_per_client_module": 1e3 * wall / (n * mods), "reduce_seconds": reduce,
               "n_pairs": res.diagnostics["n_pairs"], "decision": res.decision}
        print("  " + json.dumps(row))
        return row

    print(f"scaling: modules {shape[0]}x{shape[1]}, rank {rank}, sampled pairs")
    return {"shape": list(shape), "rank": rank, "pairs": "sampled",
            "vs_clients": [one(n, 1) for n in ns], "vs_modules": [one(n_for_modules, m) for m in module_counts]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-llm", action="store_true", help="the small sizes only (seconds)")
    ap.add_argument("--quick", action="store_true", help="LLM part on 8 of the 64 modules and N = 30 (about 2 minutes)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--round-seconds", type=float, default=DEMO_ROUND_SECONDS,
                    help="demo round wall time for small.clair_share_of_round (default: issue #21's 9 s)")
    ap.add_argument("--no-slow", action="store_true",
                    help="skip CLAIR's threaded path (fit.LOCKSTEP = False), timed beside the default by default")
    ap.add_argument("--flowertune", action="store_true",
                    help="also the FlowerTune-style sizes (30 clients x 16 modules rank 4, 10 x 4 rank 32: minutes)")
    ap.add_argument("--scaling", action="store_true",
                    help="only run_clair's time against N (10, 30, 100, 300) and the module count")
    args = ap.parse_args()
    t_start = time.perf_counter()
    out: dict = {"load_average_start": os.getloadavg(), "reps": args.reps}
    if args.scaling:
        out["scaling"] = scaling()
        out["total_seconds"] = time.perf_counter() - t_start
        print(json.dumps(out, default=str))
        return
    slow = not args.no_slow
    small = run_size("small (copy task, no shared structure)", small_uploads(structured=False), ClairConfig(),
                     args.reps, slow)
    small["clair_share_of_round"] = small["methods"]["clair"]["median"] / args.round_seconds
    small["round_seconds"] = args.round_seconds
    small["round_seconds_source"] = ("issue #21 (default demo, measured there)" if args.round_seconds == DEMO_ROUND_SECONDS
                                     else "--round-seconds")
    out["small"] = small
    out["small_structured"] = run_size("small (copy task, shared subspace, 1 contaminated)",
                                       small_uploads(structured=True), ClairConfig(), args.reps, slow)
    if args.flowertune:  # FlowerTune-style sizes: more clients, more modules, higher rank
        for key, (n, layers, rank) in FLOWERTUNE_SIZES.items():
            out[key] = run_size(f"{key} ({n} clients, {4 * layers} modules, rank {rank}, no shared structure)",
                                small_uploads(n=n, rank=rank, layers=layers), ClairConfig(), args.reps, slow)
    if not args.skip_llm:
        n, mods = (30, 8) if args.quick else (100, 64)
        updates, _, _ = seven_b_uploads(n, mods, (4096, 4096), 16)
        llm = run_size(f"llm ({n} clients, {mods} modules of 4096x4096, rank 16)", updates,
                       ClairConfig(pairs="sampled", pair_degree=4), args.reps)
        llm["n_modules"] = mods
        out["llm"] = llm
    out["load_average_end"] = os.getloadavg()
    out["total_seconds"] = time.perf_counter() - t_start
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
