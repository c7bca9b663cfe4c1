"""jaxgrad.common.checks: as_names reads a list of names in every spelling a config or a command
line gives it."""

from __future__ import annotations

from jaxgrad.common.checks import as_names


def test_as_names_splits_every_spelling():
    assert as_names("add, sub") == as_names(("add,sub",)) == as_names(["add", " sub", ""]) == (
        "add", "sub")
    assert as_names(None) is None
