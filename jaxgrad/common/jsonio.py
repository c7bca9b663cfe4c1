"""JSON files of a run directory: written atomically (a reader never sees half a file), by
process 0 where every process computed the same value, and read back."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Mapping

import jax
import numpy as np

from jaxgrad.common.distributed import barrier


def jsonable(value: Any) -> Any:
    """``value`` with numpy/jax scalars and arrays as Python numbers and lists (for JSON)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(value).item() if np.ndim(value) == 0 else np.asarray(value).tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def read_json(path: str) -> Any:
    """The JSON value in the file ``path``."""
    with open(path) as f:
        return json.load(f)


def atomic_write_json(path: str, obj: Any, *, ensure_ascii: bool = True, sort_keys: bool = False,
                      newline: bool = False) -> None:
    """Write ``obj`` to ``path`` as indented JSON (``indent=1``), atomically: through a temporary
    file of a unique name in the same directory (several processes may write the same file at
    once), synced and renamed over ``path``. Every process that calls it writes."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                               prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=1, ensure_ascii=ensure_ascii, sort_keys=sort_keys)
            if newline:
                fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` (numpy values as Python ones, :func:`jsonable`) to ``path`` atomically, on
    process 0 only: every process computed the same value, one writes it."""
    if jax.process_index() != 0:
        return
    atomic_write_json(path, jsonable(obj))


def write_shared_json(path: str, obj: Any, barrier_name: str) -> Any:
    """Write ``obj`` (process 0) and read it back on every process, after the barrier
    ``barrier_name`` when there are several (the others must not read before process 0 has
    written)."""
    write_json(path, obj)
    barrier(barrier_name)
    return read_json(path)
