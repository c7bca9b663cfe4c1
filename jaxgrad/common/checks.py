"""Argument checks, config values and the full-precision matmul shared by the modules.

Each check returns the value converted (``int`` / ``float``) or raises naming the argument:
``TypeError`` for a value of the wrong type, ``ValueError`` for one out of range.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def as_names(value) -> tuple[str, ...] | None:
    """None, a comma-separated string or a sequence of names -> a tuple of names (or None).

    Elements of a sequence are split at commas too: a tuple-valued config key set on the command
    line (``--config.pipeline.finetune_runs=selection,all``) arrives from ml_collections as the
    one-element tuple ``("selection,all",)``. Blank names are dropped.
    """
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else [
        p for t in value for p in (t.split(",") if isinstance(t, str) else [str(t)])]
    return tuple(t.strip() for t in parts if t.strip())


def section_dict(config, name: str) -> dict:
    """Section ``name`` of an ml_collections config (or of a plain mapping) as a plain dict."""
    sec = getattr(config, name)
    return sec.to_dict() if hasattr(sec, "to_dict") else dict(sec)


def positive_int(name: str, value: Any) -> int:
    """``int(value)`` for an int >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def positive_float(name: str, value: Any) -> float:
    """``float(value)`` for a finite number > 0."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(out) or out <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return out


def nonnegative_float(name: str, value: Any) -> float:
    """``float(value)`` for a finite number >= 0."""
    out = float(value)
    if not math.isfinite(out) or out < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return out


def check_feats(name: str, feats: Any) -> np.ndarray:
    """``feats`` as a float64 ``N×k`` NumPy array of real numbers with every row finite.

    Raises:
      ValueError: not 2-D, or rows holding NaN / inf (how many, and the first).
      TypeError: not real numbers.
    """
    x = np.asarray(feats)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows × k), got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    x = x.astype(np.float64)
    bad = ~np.all(np.isfinite(x), axis=1)
    if bad.any():
        raise ValueError(f"{name} has NaN or inf in {int(bad.sum())} of {x.shape[0]} rows "
                         f"(first: row {int(np.argmax(bad))})")
    return x


def matmul_highest(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` at ``Precision.HIGHEST`` (no TF32 / bfloat16 passes on GPU and TPU)."""
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
