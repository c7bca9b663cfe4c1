"""The gradient store's on-disk contract: format version, storage dtypes, the manifest (what a
store holds and how), the identity compared on resume and open, and the mismatch errors.

:mod:`jaxgrad.gradients.store` describes the layout of a store directory and reads it;
:mod:`jaxgrad.gradients.store_write` creates, resumes, writes and merges it. Files written before
this module existed are read unchanged: the format version, the manifest's keys and the file
names are the same.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from jaxgrad import __version__
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



def _new_manifest(given: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest of a new store: the fields the caller gives ``create_or_resume`` (its
    arguments of the same names, from ``example_ids`` to ``model``), checked and in canonical
    form, and those that follow from them."""
    dtype, split, model = given["dtype"], given["split"], given["model"]
    checkpoint, output_fn = given["checkpoint"], given["output_fn"]
    k, shard_size = _check_sizes(given["k"], given["shard_size"], dtype, split)
    projector = _check_identity(given["projector"], checkpoint, output_fn, model, k)
    example_ids = _check_example_ids(given["example_ids"])
    source_ids = _check_source_ids(given["source_ids"], len(example_ids))
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


def _check_sizes(k: Any, shard_size: Any, dtype: Any, split: Any) -> tuple[int, int]:
    for name, value in (("k", k), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    if not isinstance(split, str) or not split:
        raise TypeError(f"split must be a non-empty str, got {split!r}")
    return int(k), int(shard_size)


def _check_identity(projector: Any, checkpoint: Any, output_fn: Any, model: Any,
                    k: int) -> Any:
    """Checks the identity arguments; returns the projector in canonical (JSON) form."""
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
    return projector


def _check_example_ids(example_ids: Any) -> list[str]:
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
    return example_ids


def _check_source_ids(source_ids: Any, n: int) -> list[str | int]:
    if isinstance(source_ids, (str, bytes)):
        raise TypeError("source_ids must be a sequence with one source per example, not a str")
    source_ids = list(source_ids)
    if len(source_ids) != n:
        raise ValueError(
            f"source_ids must have one entry per example: got {len(source_ids)} for "
            f"{n} example_ids"
        )
    for r, s in enumerate(source_ids):
        if isinstance(s, bool) or not isinstance(s, (str, int, np.integer)):
            raise TypeError(f"source_ids must be str or int; source_ids[{r}] is {s!r}")
    source_ids = [str(s) if isinstance(s, str) else int(s) for s in source_ids]
    return source_ids


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
