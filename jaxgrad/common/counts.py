"""One rule for every setting documented as "a fraction or a count".

A value in [0, 1) is a fraction of a total; a value >= 1 must be a whole number and is a count.
The rule reads the value, never its Python type, so ``2``, ``2.0`` (what ml_collections makes of
``--config.selection.top=2`` when the default is a float) and ``"2"`` from a config file mean the
same two items, and ``1`` and ``1.0`` both mean one item. A whole collection is asked for by its
count (or by a fraction close to 1, which rounds to it); ``1.0`` never means "all".

Settings that follow it: ``data.files.validation`` / ``data.files.test`` (examples per source),
``surrogate.subset_size`` (sources per subset) and ``selection.top`` (sources kept).
"""

from __future__ import annotations

import math
import numbers

RULE = "a fraction in [0, 1) or a whole count >= 1"

# The config settings that follow the rule -> (what they count, whether 0 is allowed).
SETTINGS = {
    "surrogate.subset_size": ("sources", False),
    "selection.top": ("sources", False),
    "data.files.validation": ("examples of each source", True),
    "data.files.test": ("examples of each source", True),
}


def canonical(value):
    """The value with a whole float as an int (``2.0`` -> ``2``), so that the config fingerprints
    of ``2`` and ``2.0`` agree, as their meaning does; anything else unchanged."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def check_fraction_or_count(value, *, name: str, allow_zero: bool = False) -> float | int:
    """Validate ``value`` under the rule without a total; returns a float fraction or an int count.

    Args:
      value: int, float or a numeric string.
      name: the setting's name (``"selection.top"``), used in every message.
      allow_zero: whether 0 (none) is a valid value.

    Raises:
      TypeError: not a number (booleans included).
      ValueError: negative, NaN, zero when ``allow_zero`` is False, or >= 1 and not whole.

    >>> check_fraction_or_count(0.25, name="selection.top"), check_fraction_or_count("2", name="x")
    (0.25, 2)
    >>> check_fraction_or_count(2.5, name="selection.top")
    Traceback (most recent call last):
    ValueError: selection.top must be a fraction in [0, 1) or a whole count >= 1; got 2.5, which is >= 1 but not a whole number
    """
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise TypeError(f"{name} must be {RULE}; got the string {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {RULE}; got {value!r} ({type(value).__name__})")
    value = float(value)
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise ValueError(f"{name} must be {RULE}; got {value!r}")
    if value == 0 and not allow_zero:
        raise ValueError(f"{name} must be {RULE} and not 0; got 0")
    if value < 1:
        return value
    if value != int(value):
        raise ValueError(f"{name} must be {RULE}; got {value!r}, which is >= 1 but not a whole "
                         f"number")
    return int(value)


def fraction_or_count(value, total: int, *, name: str, allow_zero: bool = False,
                      at_least_one: bool = False) -> int:
    """The number of items ``value`` asks for out of ``total``, under the rule of this module.

    A fraction gives ``round(value * total)`` (half to even, as Python rounds), raised to 1 when
    ``at_least_one``; a count is returned as is and must not exceed ``total``.

    Raises:
      TypeError / ValueError: as ``check_fraction_or_count``; ValueError also when a count
      exceeds ``total``.

    >>> fraction_or_count(0.5, 7, name="selection.top"), fraction_or_count(3.0, 7, name="x")
    (4, 3)
    """
    v = check_fraction_or_count(value, name=name, allow_zero=allow_zero)
    total = int(total)
    if isinstance(v, int):
        if v > total:
            raise ValueError(f"{name}={v} asks for {v} of only {total}; give a count <= {total} "
                             f"or a fraction below 1")
        return v
    n = int(round(v * total))
    return max(1, n) if at_least_one and total > 0 else n
