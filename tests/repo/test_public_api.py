"""The public API of ``jaxgrad`` and its packages: every name in ``__all__`` resolves to the
object its defining module holds, the lazy table and the type checker's imports agree, and the
names are listed one a line, sorted (optax's convention); ``import jaxgrad`` pulls in none of
the heavy optional dependencies."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys

import pytest

import jaxgrad

PACKAGES = ("jaxgrad", "jaxgrad.estimate", "jaxgrad.gradients", "jaxgrad.groups", "jaxgrad.select",
            "jaxgrad.train")


@pytest.mark.parametrize("name", PACKAGES)
def test_every_public_name_resolves(name):
    package = importlib.import_module(name)
    assert package.__all__ == sorted(package.__all__), f"{name}.__all__ is not sorted"
    assert len(set(package.__all__)) == len(package.__all__), f"{name}.__all__ repeats a name"
    for public in package.__all__:
        obj = getattr(package, public)
        if inspect.isclass(obj) or inspect.isfunction(obj):  # defined in jaxgrad, same object
            home = obj.__module__
            assert home.startswith("jaxgrad."), f"{name}.{public} comes from {home}"
            assert getattr(importlib.import_module(home), obj.__name__) is obj, (name, public)


@pytest.mark.parametrize("name", ("jaxgrad", "jaxgrad.estimate", "jaxgrad.gradients",
                                  "jaxgrad.select", "jaxgrad.train"))
def test_lazy_table_matches_the_type_checking_imports(name):
    """For type checkers: every lazily exported name is also imported under TYPE_CHECKING, from
    the module the table names, and ``__all__`` is exactly the table's keys."""
    package = importlib.import_module(name)
    tree = ast.parse(inspect.getsource(package))
    checked = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and len(imp.names) == 1, \
                    f"{name}: one name per TYPE_CHECKING import line"
                checked[imp.names[0].name] = imp.module
    assert checked == package._EXPORTS
    assert sorted(package.__all__) == sorted(package._EXPORTS)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'fit_subset'"):
        jaxgrad.fit_subset  # noqa: B018


def test_import_jaxgrad_is_light():
    code = ("import sys, jaxgrad, jaxgrad.models, jaxgrad.common.flat; "
            "bad = [m for m in ('datasets', 'transformers', 'ml_collections') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"`import jaxgrad` imported heavy modules: {proc.stdout} {proc.stderr[-500:]}"
