"""Threads: the BLAS thread limit inside CLAIR, and the per-module thread map.

CLAIR runs one solve per module on a thread each (numpy, LAPACK and torch's kernels release the
GIL); every BLAS call inside is kept single-threaded, since OpenBLAS thread hand-offs on the
small matrices of the reduced problem cost far more than they save on a loaded machine.
"""

from __future__ import annotations

import ctypes
import glob
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import scipy
import torch

T = TypeVar("T")
R = TypeVar("R")


def _openblas() -> list[tuple]:
    """``(set, get)`` thread functions of the OpenBLAS builds numpy and scipy bundle.

    numpy and scipy wheels each ship their own OpenBLAS (64- and 32-bit integer builds), so
    both are set: scipy's LAPACK and BLAS calls would otherwise spawn threads of their own.
    """
    found = []
    for pkg, suffix in ((np, "64_"), (scipy, "")):
        libdir = os.path.join(os.path.dirname(pkg.__file__), os.pardir, f"{pkg.__name__}.libs")
        for path in glob.glob(os.path.join(libdir, "*openblas*")):
            try:
                lib = ctypes.CDLL(path)
                found.append((getattr(lib, f"scipy_openblas_set_num_threads{suffix}"),
                              getattr(lib, f"scipy_openblas_get_num_threads{suffix}")))
                break
            except (OSError, AttributeError):
                continue
    return found


_BLAS = _openblas()


def blas_thread_count() -> int:
    """Threads numpy's BLAS uses now (0 for an unknown build)."""
    return int(_BLAS[0][1]()) if _BLAS else 0


@contextmanager
def blas_threads(n: int):
    """Temporarily limit the BLAS of numpy and scipy to ``n`` threads (a no-op for unknown
    builds), and torch's intra-op pool to one.

    The solver's torch kernels run on cache-sized chunks, too small to share; and torch's pool
    spinning beside a multi-threaded BLAS on the same cores was measured 4-8x slower.
    """
    old = [int(getter()) for _, getter in _BLAS]
    old_torch = torch.get_num_threads()
    for setter, _ in _BLAS:
        setter(int(n))
    torch.set_num_threads(1)
    try:
        yield
    finally:
        for (setter, _), k in zip(_BLAS, old):
            setter(k)
        torch.set_num_threads(old_torch)


def map_lazy(fn: Callable[[T], R], items: Sequence[T], workers: int | None) -> Iterator[R]:
    """``fn`` over ``items`` in order on up to ``workers`` threads (``None``: one per core).

    On one worker it is sequential and lazy, so a caller may stop early (the lambda path does).
    """
    workers = min(len(items), workers or os.cpu_count() or 1)
    if workers <= 1:
        return map(fn, items)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return iter(list(pool.map(fn, items)))


def map_all(fn: Callable[[T], R], items: Sequence[T], workers: int | None) -> list[R]:
    """``[fn(x) for x in items]`` on a thread pool."""
    return list(map_lazy(fn, items, workers))
