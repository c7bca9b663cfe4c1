"""Resumable on-disk store of projected per-sample gradients (step 2 of GradEx).

For every sample i of a split, step 2 computes the projected gradient ``x_i = Pᵀ ∇θ f_i(θ*)``
(k numbers) and the output ``f_i(θ*)`` (one number). Later stages fit thousands of surrogates on
subsets of these rows, so they are kept on disk, read memory-mapped, and written in shards so
that a long gradient run that is killed resumes at the first missing shard.

Layout of a store directory::

    manifest.json            what is stored and how; written first, atomically
    shard_00000.feats.npy    feats of rows [0, shard_size), shape (rows, k), storage dtype
    shard_00000.f.npy        f of the same rows, shape (rows,)
    shard_00001.feats.npy    rows [shard_size, 2 * shard_size) ...

Shard ``i`` always covers rows ``[i * shard_size, min((i + 1) * shard_size, N))`` of the
manifest's ``example_ids`` order, whoever writes it.

The manifest holds everything that identifies the numbers: model, checkpoint (identity and hash,
as the caller passes them), output function, projector (seed, kind, D, k ...), k, storage dtype,
split, example ids (row order) and their source ids, shard size and count, plus the jaxgrad
version, the creation time and a format version. Resuming or opening a store compares the
identifying fields with what the caller asks for and refuses, naming each differing field with
the expected and found values, rather than mix gradients of two runs (the GradEx authors' code
silently skipped or mixed gradient files). The jaxgrad version and creation time are recorded,
not compared, so a store resumes across jaxgrad upgrades of the same format version.

Crash safety. Every file is written under a temporary name, flushed to disk and then
``os.replace``-d into place, so a file under its final name is always complete. A shard counts
as present only when both of its files exist with the expected ``.npy`` header (dtype, shape) and
the file size that header implies; a shard with one file, or with ``*.tmp`` leftovers only, is
missing and is rewritten on resume (leftovers are deleted).

Storage dtypes: ``float32``, ``float16`` and ``bfloat16`` (rounded to nearest even with
``ml_dtypes``, which jax ships). ``.npy`` has no name for bfloat16, so bfloat16 shards hold the
raw bits as ``uint16``; the manifest says how to read them. Whatever the storage dtype, reads
return float32.

Several processes (e.g. one per host) fill one store. Shards are global, and process ``p`` of
``n`` owns the strided slice of shards ``i`` with ``i % n == p``, which it writes straight into
the same directory (a shared file system). Each process writes the manifest if it does not exist
yet (identical content apart from the creation time, written atomically: the last one wins) and
records what it was asked for in ``proc_{p:03d}.json``. Once all have finished, process 0 calls
``GradientStore.merge(path)``: it checks that all n processes recorded the same identity as the
manifest and that every shard is present, then deletes the records and temporary leftovers. The
result is byte for byte the store one process writing everything would leave (only the
manifest's creation time differs). ``GradientStore.open`` refuses a store whose process records
are still there, i.e. one that was never merged.

Example::

    store = GradientStore.create_or_resume(
        workdir / "grads_train", example_ids=ids, source_ids=sources, k=2048,
        projector=projector_identity, checkpoint={"path": ckpt, "sha256": digest},
        output_fn={"name": "logit_odds", "eps": 1e-6}, split="train", dtype="bfloat16")
    for i in store.missing_shards():
        start, stop = store.shard_rows(i)
        feats_Rxk, f_R = compute(ids[start:stop])
        store.write_shard(i, feats_Rxk, f_R)

    store = GradientStore.open(workdir / "grads_train", checkpoint=..., projector=...)
    feats_NxK, f_N, ids = store.feats_for(sources=["alpaca", "cot"])
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from jaxgrad.gradients.manifest import (
    _NPY_DTYPE,
    _PROC_RECORD_RE,
    IncompleteStoreError,
    _canonical,
    _decode,
    _format_indices,
    _npy_matches,
    _raise_on_mismatch,
    _short_list,
    read_manifest,
)
from jaxgrad.gradients.store_write import StoreWriter


def _manifest_field(key: str, doc: str) -> property:
    """A read-only property of :class:`GradientStore`: the manifest's field ``key``."""
    return property(lambda store: store._manifest[key], doc=doc)


class GradientStore(StoreWriter):
    """A directory of projected per-sample gradients and outputs; see the module docstring.

    Create instances with ``create_or_resume`` (to write, and read once complete), ``open`` (to
    read a finished store) or ``merge`` (to finish a store written by several processes). The
    writing methods (``create_or_resume``, ``write_shard``, ``merge``) are inherited from
    :class:`jaxgrad.gradients.store_write.StoreWriter`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        manifest: dict[str, Any],
        *,
        process_index: int = 0,
        process_count: int = 1,
        writable: bool = False,
    ):
        """Wraps an already validated manifest; use the class methods instead."""
        self._path = os.fspath(path)
        self._manifest = manifest
        self._process_index = process_index
        self._process_count = process_count
        self._writable = writable
        self._row_of_id: dict[str, int] | None = None
        self._rows_of_source: dict[Any, np.ndarray] | None = None

    # ---------------------------------------------------------------------------------------
    # Construction.

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        projector: Mapping[str, Any] | None = None,
        checkpoint: str | Mapping[str, Any] | None = None,
        output_fn: str | Mapping[str, Any] | None = None,
    ) -> GradientStore:
        """Opens a complete store for reading, checking what it holds.

        Args:
          path: the store directory.
          projector: if given, the projector identity the store must have been made with.
          checkpoint: if given, the checkpoint identity it must have been made with.
          output_fn: if given, the output function it must have been made with.

        Returns:
          A read-only store.

        Raises:
          FileNotFoundError: no manifest at ``path``.
          StoreMismatchError: the store was made with another projector, checkpoint or output
            function (field, expected and found are named).
          IncompleteStoreError: shards are missing (listed), or a multi-process store was not
            merged.
        """
        path = os.fspath(path)
        manifest = read_manifest(path, required=True)
        requested = {
            "projector": projector,
            "checkpoint": checkpoint,
            "output_fn": output_fn,
        }
        diffs = []
        for name, value in requested.items():
            if value is None:
                continue
            value = _canonical(value, name)
            if value != manifest[name]:
                diffs.append((name, value, manifest[name]))
        _raise_on_mismatch(diffs, f"The gradient store at {path!r} holds something else:")
        store = cls(path, manifest)
        records = store._process_records()
        if records:
            raise IncompleteStoreError(
                f"The gradient store at {path!r} was written by several processes and not "
                f"merged ({len(records)} process records left); call "
                f"GradientStore.merge({path!r}) once all processes have finished."
            )
        store._require_complete()
        return store

    # ---------------------------------------------------------------------------------------
    # Description.

    @property
    def path(self) -> str:
        return self._path

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest as stored (do not modify)."""
        return self._manifest

    num_examples = _manifest_field("num_examples", "N, the number of rows (int).")
    num_shards = _manifest_field("num_shards", "The number of shards (int).")
    shard_size = _manifest_field("shard_size", "Rows per shard, the last one may have fewer.")
    k = _manifest_field("k", "The width of a feature row, the projection dimension (int).")
    dtype = _manifest_field("dtype", "The storage dtype (reads always return float32).")
    example_ids = _manifest_field("example_ids", "Row order: the id of each row (do not modify).")
    source_ids = _manifest_field("source_ids", "The source of each row (do not modify).")

    @property
    def sources(self) -> list[str | int]:
        """The distinct sources, in order of first appearance."""
        return list(self._source_index())

    process_index = property(operator.attrgetter("_process_index"),
                             doc="p, the index of this process (int).")
    process_count = property(operator.attrgetter("_process_count"),
                             doc="The number of processes writing the store (int).")

    @property
    def owned_shards(self) -> list[int]:
        """The shards this process writes: ``i % process_count == process_index``."""
        return list(range(self._process_index, self.num_shards, self._process_count))

    def shard_rows(self, i: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` that shard ``i`` covers."""
        i = self._check_shard_index(i)
        start = i * self.shard_size
        return start, min(start + self.shard_size, self.num_examples)

    def missing_shards(self) -> list[int]:
        """Shards this process owns that are not (validly) on disk yet, ascending."""
        return self._missing(self.owned_shards)

    @property
    def complete(self) -> bool:
        """Whether every shard of the store (whoever owns it) is on disk."""
        return not self._missing(range(self.num_shards))

    def rows_for_source(self, source: str | int) -> np.ndarray:
        """Row indices (ascending, int64) of the samples of ``source``."""
        index = self._source_index()
        if source not in index:
            raise ValueError(
                f"source {source!r} is not in this store; its sources are "
                f"{_short_list(list(index))}"
            )
        return index[source].copy()

    def __repr__(self) -> str:
        return (
            f"GradientStore({self._path!r}, split={self._manifest['split']!r}, "
            f"N={self.num_examples}, k={self.k}, dtype={self.dtype}, shards={self.num_shards})"
        )

    # ---------------------------------------------------------------------------------------
    # Reading (float32 whatever the storage dtype).

    def read_shard(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard ``i`` as float32 ``(feats_Rxk, f_R)``; reads only that shard."""
        i = self._check_shard_index(i)
        if self._missing([i]):
            raise IncompleteStoreError(f"shard {i} of {self._path!r} is missing")
        return (
            _decode(self._load(i, "feats"), self.dtype),
            _decode(self._load(i, "f"), self.dtype),
        )

    def feats(self) -> np.ndarray:
        """All projected gradients, float32 of shape (N, k).

        The shards are memory-mapped and concatenated into one new in-memory array (N·k·4
        bytes). To stream a large store use ``read_shard``; for a subset, ``feats_for``.
        """
        self._require_complete()
        return np.concatenate(
            [_decode(self._load(i, "feats"), self.dtype) for i in range(self.num_shards)]
        )

    def f(self) -> np.ndarray:
        """All outputs f_i(θ*), float32 of shape (N,)."""
        self._require_complete()
        return np.concatenate(
            [_decode(self._load(i, "f"), self.dtype) for i in range(self.num_shards)]
        )

    def feats_for(
        self,
        example_ids: Iterable[str] | None = None,
        sources: Iterable[str | int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The rows of some examples or sources, reading only those rows.

        Args:
          example_ids: ids of the rows wanted, in the order wanted (repeats allowed).
          sources: sources wanted; rows come source by source in the order given, each
            source's rows in store order. Give ``example_ids`` or ``sources``, or neither for
            every row.

        Returns:
          ``(feats_Rxk, f_R, ids)``: float32 features and outputs of the R rows, and their ids.
        """
        if example_ids is not None and sources is not None:
            raise ValueError("give example_ids or sources, not both")
        if example_ids is not None:
            if isinstance(example_ids, str):
                raise TypeError("example_ids must be a sequence of ids, not a single str")
            rows_R = self._rows_of_ids(list(example_ids))
        elif sources is not None:
            if isinstance(sources, str):
                raise TypeError("sources must be a sequence of sources, not a single str")
            sources = list(sources)
            if not sources:
                rows_R = np.zeros((0,), np.int64)
            else:
                rows_R = np.concatenate([self.rows_for_source(s) for s in sources])
        else:
            rows_R = np.arange(self.num_examples, dtype=np.int64)
        feats_Rxk, f_R = self._read_rows(rows_R)
        ids = self.example_ids
        return feats_Rxk, f_R, [ids[r] for r in rows_R.tolist()]

    # ---------------------------------------------------------------------------------------
    # Internals.

    def _shard_file(self, i: int, kind: str) -> str:
        return os.path.join(self._path, f"shard_{i:05d}.{kind}.npy")
    def _process_records(self) -> list[str]:
        return sorted(
            os.path.join(self._path, name)
            for name in os.listdir(self._path)
            if _PROC_RECORD_RE.match(name)
        )
    def _check_shard_index(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"shard index must be an int, got {type(i).__name__}")
        if not 0 <= i < self.num_shards:
            raise ValueError(f"shard index {i} out of range [0, {self.num_shards})")
        return int(i)

    def _expected_shape(self, i: int, kind: str) -> tuple[int, ...]:
        start, stop = self.shard_rows(i)
        return (stop - start, self.k) if kind == "feats" else (stop - start,)

    def _valid(self, i: int) -> bool:
        return all(
            _npy_matches(self._shard_file(i, kind), _NPY_DTYPE[self.dtype],
                         self._expected_shape(i, kind))
            for kind in ("feats", "f")
        )

    def _missing(self, shards: Iterable[int]) -> list[int]:
        return [i for i in shards if not self._valid(i)]

    def _require_complete(self) -> None:
        missing = self._missing(range(self.num_shards))
        if missing:
            raise IncompleteStoreError(
                f"The gradient store at {self._path!r} is incomplete: {len(missing)} of "
                f"{self.num_shards} shards are missing: {_format_indices(missing)}. Resume the "
                f"gradient computation (GradientStore.create_or_resume + write_shard for "
                f"missing_shards())."
            )

    def _load(self, i: int, kind: str) -> np.ndarray:
        return np.load(self._shard_file(i, kind), mmap_mode="r", allow_pickle=False)

    def _read_rows(self, rows_R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 feats and f of the given rows, touching only the shards (and pages) needed."""
        feats_Rxk = np.empty((rows_R.size, self.k), np.float32)
        f_R = np.empty((rows_R.size,), np.float32)
        if rows_R.size == 0:
            return feats_Rxk, f_R
        shard_R = rows_R // self.shard_size
        order = np.argsort(shard_R, kind="stable")
        shards, starts = np.unique(shard_R[order], return_index=True)
        needed = [int(i) for i in shards]
        missing = self._missing(needed)
        if missing:
            raise IncompleteStoreError(
                f"shards {_format_indices(missing)} of {self._path!r} needed for these rows "
                f"are missing"
            )
        for i, lo, hi in zip(needed, starts, list(starts[1:]) + [rows_R.size]):
            out = order[lo:hi]
            local = rows_R[out] - i * self.shard_size
            feats_Rxk[out] = _decode(self._load(i, "feats")[local], self.dtype)
            f_R[out] = _decode(self._load(i, "f")[local], self.dtype)
        return feats_Rxk, f_R

    def _rows_of_ids(self, wanted: list[str]) -> np.ndarray:
        if self._row_of_id is None:
            self._row_of_id = {e: r for r, e in enumerate(self.example_ids)}
        unknown = [e for e in wanted if e not in self._row_of_id]
        if unknown:
            raise ValueError(
                f"{len(unknown)} of the requested example_ids are not in this store: "
                f"{_short_list(unknown)}"
            )
        return np.asarray([self._row_of_id[e] for e in wanted], dtype=np.int64)

    def _source_index(self) -> dict[Any, np.ndarray]:
        if self._rows_of_source is None:
            rows: dict[Any, list[int]] = {}
            for r, s in enumerate(self.source_ids):
                rows.setdefault(s, []).append(r)
            self._rows_of_source = {s: np.asarray(v, np.int64) for s, v in rows.items()}
        return self._rows_of_source
