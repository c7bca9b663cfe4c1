"""Lazy public names for a package ``__init__`` (PEP 562 module ``__getattr__`` / ``__dir__``).

A package lists ``{public name: defining module}`` and imports a module only when one of its names
is first used, so importing the package stays light. Type checkers see the same names through
``if TYPE_CHECKING:`` imports in the package (``tests/repo/test_public_api.py`` checks both agree).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str], namespace: Mapping[str, Any],
                 fallback: Callable[[str], Any] | None = None
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose names ``exports`` maps to modules;
    ``fallback(name)`` serves other names (e.g. :func:`jaxgrad._compat.moved_names`).

    Raises (from ``__getattr__``): AttributeError naming the package and an unknown name.
    """
    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            if fallback is not None:
                return fallback(name)
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    def __dir__() -> list[str]:
        return sorted(list(namespace) + list(exports))

    return __getattr__, __dir__
