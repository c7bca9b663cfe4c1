"""Writing a gradient store: create or resume it, write its shards atomically, merge what
several processes wrote.

:class:`StoreWriter` holds these methods of :class:`jaxgrad.gradients.store.GradientStore`, which
derives from it: one class, one API, its writing half here and its reading half (and the layout
and crash-safety rules, in the module docstring) in :mod:`jaxgrad.gradients.store`. The manifest
and the on-disk form of the numbers are :mod:`jaxgrad.gradients.manifest`'s.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from jaxgrad.gradients.manifest import (
    _SHARD_FILE_RE,
    _STORAGE_TYPE,
    IncompleteStoreError,
    StoreMismatchError,
    _check_process,
    _decode,
    _encode,
    _format_indices,
    _identity,
    _identity_diffs,
    _new_manifest,
    _raise_on_mismatch,
    _short_list,
    _write_json,
    read_manifest,
)
from jaxgrad.rundir import MANIFEST_FILE

if TYPE_CHECKING:
    from jaxgrad.gradients.store import GradientStore


class StoreWriter:
    """The writing half of :class:`~jaxgrad.gradients.store.GradientStore` (its base class).

    Its methods use the reading half's shard bookkeeping (``shard_rows``, ``_missing``,
    ``_shard_file``, ``_process_records`` ...), defined on ``GradientStore``.
    """

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
        manifest = _new_manifest({
            "example_ids": example_ids, "source_ids": source_ids, "split": split, "k": k,
            "dtype": dtype, "shard_size": shard_size, "model": model, "checkpoint": checkpoint,
            "output_fn": output_fn, "projector": projector,
        })
        path = os.fspath(path)
        found = _manifest_on_disk(path, manifest)
        store = cls(
            path, found, process_index=process_index, process_count=process_count, writable=True
        )
        store._start_writing(manifest)
        return store

    def _start_writing(self, manifest: Mapping[str, Any]) -> None:
        """Records what this process was asked for (several processes), or checks and tidies up
        what earlier multi-process runs left (one process: nothing else writes now)."""
        if self._process_count > 1:
            _write_json(
                self._record_path(self._process_index),
                {
                    "process_index": self._process_index,
                    "process_count": self._process_count,
                    "identity": _identity(manifest),
                },
            )
            self._remove_tmp_files(self.owned_shards)
        else:
            self._check_process_records(require_all=False)
            for record in self._process_records():
                os.remove(record)
            self._remove_tmp_files(None)

    @classmethod
    def merge(cls, path: str | os.PathLike) -> GradientStore:
        """Finishes a store written by several processes; call once, after all have finished.

        Shards already lie in one directory (see :mod:`jaxgrad.gradients.store`), so merging
        checks that every process recorded the same identity as the manifest and that all shards
        are present, then removes the process records and temporary leftovers. Merging a store one
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

    def _record_path(self, process_index: int) -> str:
        return os.path.join(self._path, f"proc_{process_index:03d}.json")

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


def _manifest_on_disk(path: str, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest of the store at ``path``: the one found there if it holds the same thing as
    ``manifest`` (else StoreMismatchError), or ``manifest``, written, for a new store."""
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
    return found


def _stray_shard_files(path: str) -> bool:
    return any(_SHARD_FILE_RE.match(name) for name in os.listdir(path))


def _as_float_array(value: Any, name: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except Exception as e:  # pylint: disable=broad-except
        raise TypeError(f"{name} must be an array, got {type(value).__name__}: {e}") from None
    if array.dtype.kind != "f" and array.dtype != np.dtype(ml_dtypes.bfloat16):
        raise TypeError(f"{name} must be a floating array, got dtype {array.dtype}")
    return array
