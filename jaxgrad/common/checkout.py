"""The checkout jaxgrad runs from: its ``configs`` package made importable for the command-line
scripts, before their flags load a config file (so without importing anything heavy)."""

from __future__ import annotations

import os
import sys

# jaxgrad/common/checkout.py -> the directory holding the jaxgrad package
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_configs_importable() -> str | None:
    """Put the repository root on ``sys.path`` so that a user's config file can ``from configs
    import demo`` (the shipped configs) from any directory, without ``PYTHONPATH``. The root is
    the directory above the ``jaxgrad`` package when it holds ``configs/__init__.py`` (a
    checkout, installed editable); the root added, or None."""
    if not os.path.isfile(os.path.join(_ROOT, "configs", "__init__.py")):
        return None
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)
    return _ROOT
