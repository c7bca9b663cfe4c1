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

import datetime
import glob
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from jaxgrad.common.jsonio import atomic_write_json
from jaxgrad.config import STORAGE_DTYPES
from jaxgrad.rundir import MANIFEST_FILE

FORMAT_VERSION = 1

# On-disk .npy dtype of each storage dtype (little-endian, so the bytes do not depend on the
# machine that wrote them).
_NPY_DTYPE = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),  # raw bfloat16 bits
}
# The floating type each storage dtype stands for.
_STORAGE_TYPE = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
# Manifest fields that identify the stored numbers; resume and merge compare exactly these.
_IDENTITY_FIELDS = (
    "format_version",
    "model",
    "checkpoint",
    "output_fn",
    "projector",
    "k",
    "dtype",
    "split",
    "num_examples",
    "shard_size",
    "example_ids",
    "source_ids",
)
_ID_LIST_FIELDS = ("example_ids", "source_ids")
_SHARD_FILE_RE = re.compile(r"^shard_\d{5}\.(feats|f)\.npy$")
_PROC_RECORD_RE = re.compile(r"^proc_(\d{3})\.json$")
_HOW_TO_PROCEED = (
    "Use a new store directory (e.g. a new workdir) for these settings, or delete the existing "
    "store directory to recompute it."
)


class StoreMismatchError(ValueError):
    """The store on disk holds something else than what was asked for."""


class IncompleteStoreError(ValueError):
    """The store misses shards (or process records), so it cannot be read as a whole."""


class GradientStore:
    """A directory of projected per-sample gradients and outputs; see the module docstring.

    Create instances with ``create_or_resume`` (to write, and read once complete), ``open`` (to
    read a finished store) or ``merge`` (to finish a store written by several processes).
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
    def create_or_resume(
        cls,
        path: str | os.PathLike,
        *,
        example_ids: Sequence[str],
        source_ids: Sequence[str | int],
        k: int,
        projector: Mapping[str, Any],
        checkpoint: str | Mapping[str, Any],
        output_fn: str | Mapping[str, Any],
        split: str,
        dtype: str = "float32",
        shard_size: int = 1024,
        model: str | Mapping[str, Any] | None = None,
        process_index: int = 0,
        process_count: int = 1,
    ) -> GradientStore:
        """Creates a store at ``path``, or resumes the one there if it holds the same thing.

        Args:
          path: the store directory (created if needed).
          example_ids: one unique id per row, in row order (N ids).
          source_ids: the data source (str or int) of each row, N entries.
          k: projection dimension, the width of each feature row.
          projector: the projector's identity, e.g. ``{"kind": "rademacher", "seed": 0,
            "dim": D, "k": k}``; JSON-serialisable. A ``"k"`` entry must equal ``k``.
          checkpoint: the checkpoint's identity and hash, e.g. ``{"path": ..., "sha256": ...}``
            or a string; JSON-serialisable.
          output_fn: the output function, e.g. ``{"name": "logit_odds", "eps": 1e-6}`` or a
            name; JSON-serialisable.
          split: the split these rows come from, e.g. ``"train"`` or ``"target_val"``.
          dtype: storage dtype, one of ``"float32"``, ``"float16"``, ``"bfloat16"``.
          shard_size: rows per shard (the last shard may be shorter).
          model: the model's identity (name or path), or None; JSON-serialisable.
          process_index: this process's index p; it writes shards ``i % process_count == p``.
          process_count: number of processes filling the store together.

        Returns:
          A writable store; ``missing_shards()`` lists the shards this process still has to
          write.

        Raises:
          StoreMismatchError: ``path`` holds a store of something else (each differing field is
            named, with expected and found values).
          ValueError, TypeError: bad arguments.
        """
        process_index, process_count = _check_process(process_index, process_count)
        manifest = _new_manifest(
            example_ids=example_ids,
            source_ids=source_ids,
            k=k,
            projector=projector,
            checkpoint=checkpoint,
            output_fn=output_fn,
            split=split,
            dtype=dtype,
            shard_size=shard_size,
            model=model,
        )
        path = os.fspath(path)
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"path {path!r} exists and is not a directory")
        os.makedirs(path, exist_ok=True)

        found = read_manifest(path, required=False)
        if found is None and _stray_shard_files(path):
            # Another process may have created the store between our two looks.
            found = read_manifest(path, required=False)
            if found is None:
                raise StoreMismatchError(
                    f"{path!r} holds shard files but no {MANIFEST_FILE}, so nothing says which "
                    f"run they come from. Delete them (or the directory), or use a new one."
                )
        if found is None:
            _write_json(os.path.join(path, MANIFEST_FILE), manifest)
            found = manifest
        else:
            _raise_on_mismatch(
                _identity_diffs(manifest, found),
                f"The gradient store at {path!r} was made for other settings:",
            )

        store = cls(
            path, found, process_index=process_index, process_count=process_count, writable=True
        )
        if process_count > 1:
            _write_json(
                store._record_path(process_index),
                {
                    "process_index": process_index,
                    "process_count": process_count,
                    "identity": _identity(manifest),
                },
            )
            store._remove_tmp_files(store.owned_shards)
        else:
            # Nothing else writes now: check what earlier multi-process runs left, tidy up.
            store._check_process_records(require_all=False)
            for record in store._process_records():
                os.remove(record)
            store._remove_tmp_files(None)
        return store

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

    @classmethod
    def merge(cls, path: str | os.PathLike) -> GradientStore:
        """Finishes a store written by several processes; call once, after all have finished.

        Shards already lie in one directory (see the module docstring), so merging checks that
        every process recorded the same identity as the manifest and that all shards are
        present, then removes the process records and temporary leftovers. Merging a store one
        process wrote only checks that it is complete.

        Returns:
          The merged store, read-only.

        Raises:
          StoreMismatchError: a process was asked for something else than the manifest holds.
          IncompleteStoreError: a process never started, or shards are missing (listed, with the
            process that owns each).
        """
        path = os.fspath(path)
        store = cls(path, read_manifest(path, required=True))
        process_count = store._check_process_records(require_all=True)
        missing = store._missing(range(store.num_shards))
        if missing:
            owners = ""
            if process_count > 1:
                by_process: dict[int, list[int]] = {}
                for i in missing:
                    by_process.setdefault(i % process_count, []).append(i)
                owners = "; by owning process: " + ", ".join(
                    f"process {p}: {_format_indices(v)}" for p, v in sorted(by_process.items())
                )
            raise IncompleteStoreError(
                f"Cannot merge the gradient store at {path!r}: {len(missing)} of "
                f"{store.num_shards} shards are missing: {_format_indices(missing)}{owners}. "
                f"Rerun the processes that own them (they resume), then merge again."
            )
        for record in store._process_records():
            os.remove(record)
        store._remove_tmp_files(None)
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

    @property
    def num_examples(self) -> int:
        return self._manifest["num_examples"]

    @property
    def num_shards(self) -> int:
        return self._manifest["num_shards"]

    @property
    def shard_size(self) -> int:
        return self._manifest["shard_size"]

    @property
    def k(self) -> int:
        return self._manifest["k"]

    @property
    def dtype(self) -> str:
        """The storage dtype (reads always return float32)."""
        return self._manifest["dtype"]

    @property
    def example_ids(self) -> list[str]:
        """Row order: the id of each row (do not modify)."""
        return self._manifest["example_ids"]

    @property
    def source_ids(self) -> list[str | int]:
        """The source of each row (do not modify)."""
        return self._manifest["source_ids"]

    @property
    def sources(self) -> list[str | int]:
        """The distinct sources, in order of first appearance."""
        return list(self._source_index())

    @property
    def process_index(self) -> int:
        return self._process_index

    @property
    def process_count(self) -> int:
        return self._process_count

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
    # Writing.

    def write_shard(
        self,
        i: int,
        feats: Any,
        f: Any,
        *,
        allow_nonfinite: bool = False,
    ) -> None:
        """Writes shard ``i`` (cast to the storage dtype), atomically.

        Args:
          i: a shard this process owns.
          feats: projected gradients of rows ``shard_rows(i)``, shape (rows, k), floating.
          f: outputs of the same rows, shape (rows,), floating.
          allow_nonfinite: store NaN/inf (and values that overflow the storage dtype) instead
            of refusing them.

        Raises:
          ValueError: wrong shapes, a shard this process does not own, non-finite values.
          TypeError: non-floating input.
        """
        if not self._writable:
            raise ValueError(
                "this store was opened read-only; use GradientStore.create_or_resume to write"
            )
        i = self._check_shard_index(i)
        if i % self._process_count != self._process_index:
            raise ValueError(
                f"shard {i} belongs to process {i % self._process_count} (shard % "
                f"process_count), not to this process {self._process_index} of "
                f"{self._process_count}"
            )
        start, stop = self.shard_rows(i)
        rows = stop - start
        feats_Rxk = _as_float_array(feats, "feats")
        f_R = _as_float_array(f, "f")
        if feats_Rxk.shape != (rows, self.k):
            raise ValueError(
                f"feats of shard {i} must have shape (rows, k) = ({rows}, {self.k}) for rows "
                f"[{start}, {stop}), got {feats_Rxk.shape}"
            )
        if f_R.shape != (rows,):
            raise ValueError(
                f"f of shard {i} must have shape (rows,) = ({rows},) for rows [{start}, "
                f"{stop}), got {f_R.shape}"
            )
        stored_feats = _encode(feats_Rxk, self.dtype)
        stored_f = _encode(f_R, self.dtype)
        if not allow_nonfinite:
            for name, given, stored in (("feats", feats_Rxk, stored_feats), ("f", f_R, stored_f)):
                self._check_finite(name, i, start, given, stored)
        # f first, feats last: either file alone reads as a missing shard.
        self._atomic_write_npy(self._shard_file(i, "f"), stored_f)
        self._atomic_write_npy(self._shard_file(i, "feats"), stored_feats)

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

    def _record_path(self, process_index: int) -> str:
        return os.path.join(self._path, f"proc_{process_index:03d}.json")

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

    def _check_finite(
        self, name: str, i: int, start: int, given: np.ndarray, stored: np.ndarray
    ) -> None:
        if given.dtype.kind != "f":  # bfloat16 input: float32 holds it exactly
            given = given.astype(np.float32)
        bad_given = ~np.isfinite(given)
        bad_stored = ~np.isfinite(_decode(stored, self.dtype))
        for bad, what in (
            (bad_given, "non-finite values (NaN or inf)"),
            (bad_stored & ~bad_given,
             f"values beyond the range of the storage dtype {self.dtype} (largest finite "
             f"{float(ml_dtypes.finfo(_STORAGE_TYPE[self.dtype]).max):g}; they would be "
             f"stored as inf)"),
        ):
            if bad.any():
                rows = np.nonzero(bad.reshape(bad.shape[0], -1).any(axis=1))[0] + start
                ids = [self.example_ids[r] for r in rows[:5].tolist()]
                raise ValueError(
                    f"{name} of shard {i} has {what} in {rows.size} row(s): rows "
                    f"{_short_list(rows.tolist())}, example ids {_short_list(ids)}. Pass "
                    f"allow_nonfinite=True to store them anyway."
                )

    def _atomic_write_npy(self, final: str, array: np.ndarray) -> None:
        tmp = final + ".tmp"
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)

    def _remove_tmp_files(self, shards: Iterable[int] | None) -> None:
        """Deletes temporary leftovers: of the given shards only, or every one (None)."""
        if shards is None:
            leftovers = glob.glob(os.path.join(glob.escape(self._path), "*.tmp"))
        else:
            leftovers = [
                self._shard_file(i, kind) + ".tmp" for i in shards for kind in ("feats", "f")
            ]
        for name in leftovers:
            try:
                os.remove(name)
            except FileNotFoundError:
                pass

    def _check_process_records(self, *, require_all: bool) -> int:
        """Checks the process records against the manifest; returns the process count (1 if
        there are none). With ``require_all``, every process 0..n-1 must have left one."""
        records = self._process_records()
        if not records:
            return 1
        identity = _identity(self._manifest)
        counts, indices = set(), set()
        for name in records:
            with open(name) as fh:
                record = json.load(fh)
            counts.add(record["process_count"])
            indices.add(record["process_index"])
            _raise_on_mismatch(
                _identity_diffs(identity, record["identity"]),
                f"Process {record['process_index']} of the gradient store at {self._path!r} "
                f"({os.path.basename(name)}) was run with other settings than the manifest "
                f"holds, so its shards cannot be trusted:",
            )
        if len(counts) != 1:
            raise IncompleteStoreError(
                f"the process records of {self._path!r} disagree on the number of processes "
                f"({sorted(counts)}); rerun every process with the same process_count"
            )
        (count,) = counts
        if require_all:
            absent = sorted(set(range(count)) - indices)
            if absent:
                raise IncompleteStoreError(
                    f"Cannot merge the gradient store at {self._path!r}: process(es) "
                    f"{_format_indices(absent)} of {count} never started (no process record). "
                    f"Run them, then merge again."
                )
        return count


# -------------------------------------------------------------------------------------------
# Manifest helpers.


def _check_process(process_index: Any, process_count: Any) -> tuple[int, int]:
    for name, value in (("process_index", process_index), ("process_count", process_count)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if process_count < 1:
        raise ValueError(f"process_count must be >= 1, got {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index must be in [0, process_count={process_count}), got {process_index}"
        )
    return int(process_index), int(process_count)


def _new_manifest(
    *,
    example_ids: Sequence[str],
    source_ids: Sequence[str | int],
    k: int,
    projector: Mapping[str, Any],
    checkpoint: str | Mapping[str, Any],
    output_fn: str | Mapping[str, Any],
    split: str,
    dtype: str,
    shard_size: int,
    model: str | Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Validates the arguments of ``create_or_resume`` and builds the manifest."""
    from jaxgrad import __version__  # pylint: disable=import-outside-toplevel

    for name, value in (("k", k), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    k, shard_size = int(k), int(shard_size)
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    if not isinstance(split, str) or not split:
        raise TypeError(f"split must be a non-empty str, got {split!r}")
    if not isinstance(projector, Mapping):
        raise TypeError(
            f"projector must be a dict of the projector's identity (seed, kind, dim, k), got "
            f"{type(projector).__name__}"
        )
    projector = _canonical(projector, "projector")
    if "k" in projector and projector["k"] != k:
        raise ValueError(f"projector['k'] = {projector['k']!r} differs from k = {k}")
    for name, value in (("checkpoint", checkpoint), ("output_fn", output_fn)):
        if not isinstance(value, (str, Mapping)) or not value:
            raise TypeError(f"{name} must be a non-empty str or dict, got {value!r}")
    if model is not None and not isinstance(model, (str, Mapping)):
        raise TypeError(f"model must be a str, a dict or None, got {type(model).__name__}")

    if isinstance(example_ids, (str, bytes)):
        raise TypeError("example_ids must be a sequence of str ids, not a single str")
    example_ids = list(example_ids)
    if not example_ids:
        raise ValueError("example_ids must not be empty")
    for r, e in enumerate(example_ids):
        if not isinstance(e, str):
            raise TypeError(f"example_ids must be str; example_ids[{r}] is {e!r}")
    example_ids = [str(e) for e in example_ids]  # np.str_ -> str
    if len(set(example_ids)) != len(example_ids):
        seen, dups = set(), []
        for e in example_ids:
            if e in seen:
                dups.append(e)
            seen.add(e)
        raise ValueError(f"example_ids must be unique; repeated: {_short_list(dups)}")

    if isinstance(source_ids, (str, bytes)):
        raise TypeError("source_ids must be a sequence with one source per example, not a str")
    source_ids = list(source_ids)
    if len(source_ids) != len(example_ids):
        raise ValueError(
            f"source_ids must have one entry per example: got {len(source_ids)} for "
            f"{len(example_ids)} example_ids"
        )
    for r, s in enumerate(source_ids):
        if isinstance(s, bool) or not isinstance(s, (str, int, np.integer)):
            raise TypeError(f"source_ids must be str or int; source_ids[{r}] is {s!r}")
    source_ids = [str(s) if isinstance(s, str) else int(s) for s in source_ids]

    n = len(example_ids)
    return {
        "format_version": FORMAT_VERSION,
        "jaxgrad_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": None if model is None else _canonical(model, "model"),
        "checkpoint": _canonical(checkpoint, "checkpoint"),
        "output_fn": _canonical(output_fn, "output_fn"),
        "projector": projector,
        "k": k,
        "dtype": dtype,
        "npy_dtype": _NPY_DTYPE[dtype].str,
        "split": split,
        "num_examples": n,
        "shard_size": shard_size,
        "num_shards": math.ceil(n / shard_size),
        "example_ids": example_ids,
        "source_ids": source_ids,
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _canonical(value: Any, name: str) -> Any:
    """``value`` as it reads back from JSON (tuples -> lists, numpy scalars -> Python)."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, default=_json_default))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be JSON-serialisable: {e}") from None


def read_manifest(path: str, *, required: bool) -> dict[str, Any] | None:
    """The store manifest at ``path``, fields checked (None: absent and not ``required``)."""
    name = os.path.join(path, MANIFEST_FILE)
    try:
        with open(name, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        if not required:
            return None
        raise FileNotFoundError(f"no {MANIFEST_FILE} in {path!r}: not a gradient store (make one "
                                "with GradientStore.create_or_resume)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} is not valid JSON ({e}); delete the store") from None
    absent = [f for f in _IDENTITY_FIELDS + ("num_shards",) if f not in manifest]
    if absent:
        raise ValueError(f"{name} lacks the fields {absent}; delete the store")
    if manifest["format_version"] != FORMAT_VERSION:
        raise StoreMismatchError(
            f"{name} has format version {manifest['format_version']}, this jaxgrad reads "
            f"version {FORMAT_VERSION}. {_HOW_TO_PROCEED}"
        )
    return manifest


def _write_json(path: str, content: Mapping[str, Any]) -> None:
    """A store's JSON files: UTF-8 (names as written), ending in a newline, written atomically."""
    atomic_write_json(path, content, ensure_ascii=False, newline=True)


def _stray_shard_files(path: str) -> bool:
    return any(_SHARD_FILE_RE.match(name) for name in os.listdir(path))


def _digest(values: list[Any]) -> dict[str, Any]:
    text = json.dumps(values, ensure_ascii=False, separators=(",", ":"))
    return {"count": len(values), "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def _identity(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The identifying fields, id lists replaced by their count and sha256 (for records)."""
    out = {f: manifest[f] for f in _IDENTITY_FIELDS}
    for f in _ID_LIST_FIELDS:
        if isinstance(out[f], list):
            out[f] = _digest(out[f])
    return out


def _identity_diffs(
    expected: Mapping[str, Any], found: Mapping[str, Any]
) -> list[tuple[str, Any, Any]]:
    diffs = []
    for field in _IDENTITY_FIELDS:
        exp, got = expected.get(field), found.get(field)
        if field in _ID_LIST_FIELDS and isinstance(exp, list) != isinstance(got, list):
            exp = _digest(exp) if isinstance(exp, list) else exp
            got = _digest(got) if isinstance(got, list) else got
        if exp != got:
            diffs.append((field, exp, got))
    return diffs


def _raise_on_mismatch(diffs: list[tuple[str, Any, Any]], headline: str) -> None:
    if not diffs:
        return
    lines = [headline]
    for field, exp, got in diffs:
        lines.append(f"  {field}: {_describe_difference(exp, got)}")
    lines.append(_HOW_TO_PROCEED)
    raise StoreMismatchError("\n".join(lines))


def _describe_difference(expected: Any, found: Any) -> str:
    if isinstance(expected, list) and isinstance(found, list) and (
        len(expected) > 8 or len(found) > 8
    ):
        first = next(
            (r for r, (a, b) in enumerate(zip(expected, found)) if a != b),
            min(len(expected), len(found)),
        )
        detail = f"expected {len(expected)} entries, found {len(found)}"
        if first < min(len(expected), len(found)):
            detail += (
                f"; first difference at row {first}: expected {expected[first]!r}, found "
                f"{found[first]!r}"
            )
        else:
            detail += f"; they agree on the first {first} rows"
        return detail
    return f"expected {_short_json(expected)}, found {_short_json(found)}"


def _short_json(value: Any, limit: int = 300) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short_list(values: list[Any], limit: int = 10) -> str:
    if len(values) <= limit:
        return repr(values)
    return repr(values[:limit])[:-1] + f", ... ({len(values) - limit} more)]"


def _format_indices(indices: Sequence[int]) -> str:
    """``[2, 3, 4, 7]`` -> ``'[2-4, 7]'`` (at most 20 runs shown)."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in runs]
    if len(parts) > 20:
        parts = parts[:20] + [f"... ({len(parts) - 20} more runs)"]
    return "[" + ", ".join(parts) + "]"


# -------------------------------------------------------------------------------------------
# Array helpers.


def _as_float_array(value: Any, name: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except Exception as e:  # pylint: disable=broad-except
        raise TypeError(f"{name} must be an array, got {type(value).__name__}: {e}") from None
    if array.dtype.kind != "f" and array.dtype != np.dtype(ml_dtypes.bfloat16):
        raise TypeError(f"{name} must be a floating array, got dtype {array.dtype}")
    return array


def _encode(array: np.ndarray, dtype: str) -> np.ndarray:
    """Floating ``array`` in its on-disk form for storage dtype ``dtype``."""
    with np.errstate(over="ignore"):  # overflow to inf is reported by write_shard
        if dtype == "bfloat16":
            return np.ascontiguousarray(array.astype(ml_dtypes.bfloat16).view(np.uint16))
        return np.ascontiguousarray(array.astype(_NPY_DTYPE[dtype]))


def _decode(stored: np.ndarray, dtype: str) -> np.ndarray:
    """On-disk ``stored`` (possibly memory-mapped) as a new float32 array."""
    if dtype == "bfloat16":
        return np.asarray(stored).view(ml_dtypes.bfloat16).astype(np.float32)
    return np.asarray(stored).astype(np.float32)


def _npy_matches(name: str, dtype: np.dtype, shape: tuple[int, ...]) -> bool:
    """Whether ``name`` is a complete C-order .npy file of ``dtype`` and ``shape``."""
    try:
        with open(name, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                header = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                header = np.lib.format.read_array_header_2_0(fh)
            else:
                return False
            got_shape, fortran_order, got_dtype = header
            size = os.fstat(fh.fileno()).st_size
            data_offset = fh.tell()
    except (OSError, ValueError, EOFError):
        return False
    return (
        tuple(got_shape) == tuple(shape)
        and not fortran_order
        and got_dtype == dtype
        and size == data_offset + math.prod(shape) * dtype.itemsize
    )
