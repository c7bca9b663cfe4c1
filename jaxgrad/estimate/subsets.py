"""Subsets of the sources (the units selected among) and the sample masks they give.

``sample_subsets`` draws m random subsets of the sources (e.g. 1000 subsets of half of them, or
every subset of a size when there are few); ``masks_from_sources`` expands them to the S×N sample
masks :func:`jaxgrad.estimate.surrogate.fit_subsets` takes. A subset is a boolean row over the M
sources (numbered 0…M-1).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence

import numpy as np

from jaxgrad.common.checks import positive_int
from jaxgrad.common.counts import fraction_or_count

_ENUMERATE_LIMIT = 200_000  # enumerate all subsets of a size when there are at most this many


def subset_size(n_sources: int, size: float | int, *, name: str = "size") -> int:
    """The number of sources in a subset, under :mod:`jaxgrad.common.counts`' rule: a fraction in
    (0, 1) of ``n_sources`` (rounded, at least 1) or a whole count in [1, n_sources], whatever
    the Python type (``2`` and ``2.0`` are both two sources; ``1.0`` is one).

    Args:
      n_sources: M, the number of sources (a positive int).
      size: a fraction in (0, 1) of M, or a whole count in [1, M].
      name: the argument name used in error messages.

    Returns:
      The count, an int in [1, n_sources].

    Raises:
      TypeError / ValueError: ``n_sources`` not a positive int, or ``size`` outside the rule,
        naming ``name``, as :func:`jaxgrad.common.counts.fraction_or_count`.

    >>> subset_size(7, 0.3), subset_size(7, 2), subset_size(7, 2.0), subset_size(7, 0.01)
    (2, 2, 2, 1)
    """
    n_sources = positive_int("n_sources", n_sources)
    return fraction_or_count(size, n_sources, name=name, at_least_one=True)


def sample_subsets(n_sources: int, m: int, size: float | int, seed: int = 0) -> np.ndarray:
    """m random subsets of ``size`` sources each, as an m×n_sources boolean array.

    Subsets are distinct whenever m does not exceed the number C(n, size) of distinct subsets;
    past that every distinct subset appears once and the rest repeat (with a warning).
    Reproducible for a given seed (``numpy.random.default_rng``).

    Args:
      n_sources: M, the number of sources (a positive int).
      m: the number of subsets to draw (a positive int).
      size: sources per subset, as :func:`subset_size` (a fraction of M or a count).
      seed: the seed of ``numpy.random.default_rng``.

    Returns:
      m×M ``bool`` array; row s marks the sources in subset s.

    Raises:
      TypeError / ValueError: ``n_sources``, ``m`` or ``size`` invalid (:func:`subset_size`).
      ValueError: m exceeds C(M, size) when that is too large (> 200,000) to enumerate.

    >>> subsets = sample_subsets(5, 4, 0.4, seed=0)   # 4 subsets of 2 of 5 sources
    >>> subsets.shape, subsets.dtype.name, subsets.sum(axis=1).tolist()
    ((4, 5), 'bool', [2, 2, 2, 2])
    >>> len({row.tobytes() for row in subsets})       # distinct: C(5, 2) = 10 >= 4
    4
    """
    n_sources = positive_int("n_sources", n_sources)
    m = positive_int("m", m)
    count = subset_size(n_sources, size)
    rng = np.random.default_rng(seed)
    n_distinct = math.comb(n_sources, count)
    if m > n_distinct > _ENUMERATE_LIMIT:
        raise ValueError(f"sample_subsets: m = {m} exceeds the {n_distinct} distinct subsets of "
                         f"{count} of {n_sources} sources")
    if m > n_distinct // 4 and n_distinct <= _ENUMERATE_LIMIT:
        # Few distinct subsets compared with m: enumerate them and draw without replacement.
        all_subsets = _all_subsets(n_sources, count)
        if m > n_distinct:
            warnings.warn(f"sample_subsets: only {n_distinct} distinct subsets of {count} of "
                          f"{n_sources} sources exist; {m - n_distinct} of the {m} repeat",
                          stacklevel=2)
            extra = rng.integers(0, n_distinct, size=m - n_distinct)
            order = np.concatenate([rng.permutation(n_distinct), extra])
        else:
            order = rng.choice(n_distinct, size=m, replace=False)
        return all_subsets[order]
    out = np.zeros((m, n_sources), bool)
    seen: set[bytes] = set()
    filled = 0
    while filled < m:
        pick = np.argsort(rng.random(n_sources))[:count]
        row = np.zeros(n_sources, bool)
        row[pick] = True
        key = np.packbits(row).tobytes()
        if key in seen:
            continue
        seen.add(key)
        out[filled] = row
        filled += 1
    return out


def _all_subsets(n: int, count: int) -> np.ndarray:
    combos = np.array(list(itertools.combinations(range(n), count)), dtype=np.int64)
    out = np.zeros((len(combos), n), bool)
    out[np.arange(len(combos))[:, None], combos] = True
    return out


def masks_from_sources(source_ids_N: np.typing.ArrayLike, subsets: np.typing.ArrayLike | Sequence,
                       n_sources: int | None = None) -> np.ndarray:
    """Sample masks S×N from subsets of sources.

    Args:
      source_ids_N: the source (0…M-1) of each of the N samples.
      subsets: an S×M boolean array, or S sequences of source indices.
      n_sources: M (default: the width of a boolean ``subsets``, else max(source_ids) + 1).

    Returns:
      S×N booleans: sample i is in subset s iff its source is.

    >>> masks_from_sources([0, 0, 1, 2], [[0], [1, 2]]).astype(int)
    array([[1, 1, 0, 0],
           [0, 0, 1, 1]])
    """
    ids = np.asarray(source_ids_N)
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        raise ValueError(f"source_ids_N must be a 1-D array of ints, got shape {ids.shape} "
                         f"and dtype {ids.dtype}")
    if ids.size and ids.min() < 0:
        raise ValueError(f"source_ids_N must be >= 0, got {ids.min()}")
    subsets_arr = _subsets_matrix(subsets, n_sources, int(ids.max()) + 1 if ids.size else 0)
    m = subsets_arr.shape[1]
    if ids.size and ids.max() >= m:
        raise ValueError(f"source_ids_N names source {ids.max()} but the subsets cover only "
                         f"{m} sources (0…{m - 1})")
    return subsets_arr[:, ids]


def _subsets_matrix(subsets, n_sources: int | None, inferred: int) -> np.ndarray:
    arr = subsets if isinstance(subsets, np.ndarray) else None
    if arr is None and hasattr(subsets, "dtype") and hasattr(subsets, "shape"):
        arr = np.asarray(subsets)
    if arr is not None and arr.dtype == bool:
        if arr.ndim != 2:
            raise ValueError(f"subsets must be 2-D (S × sources), got shape {arr.shape}")
        if n_sources is not None and arr.shape[1] != n_sources:
            raise ValueError(f"subsets has {arr.shape[1]} columns but n_sources = {n_sources}")
        return arr
    m = inferred if n_sources is None else positive_int("n_sources", n_sources)
    rows = list(subsets)
    out = np.zeros((len(rows), m), bool)
    for s, row in enumerate(rows):
        idx = np.asarray(row, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= m):
            bad = idx[(idx < 0) | (idx >= m)]
            raise ValueError(f"subset {s} names unknown source(s) {bad.tolist()}; sources are "
                             f"0…{m - 1}")
        out[s, idx] = True
    return out
