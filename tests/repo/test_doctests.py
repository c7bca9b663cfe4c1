"""The docstring examples of jaxgrad run, and print what they say (issue 17: examples that run).

Every module of the package is imported and its ``>>>`` examples executed with :mod:`doctest`.
A module whose examples fail fails this test with doctest's report. The modules listed in
``WITH_EXAMPLES`` (every module that has examples) must keep theirs, so the test cannot pass by
finding nothing.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import jaxgrad

WITH_EXAMPLES = ("jaxgrad.common.counts", "jaxgrad.common.digest", "jaxgrad.estimate.stage",
                 "jaxgrad.estimate.subsets", "jaxgrad.models.hf_config", "jaxgrad.select.scores",
                 "jaxgrad.train.losses")


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(jaxgrad.__path__, "jaxgrad."))


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"
    if name in WITH_EXAMPLES:
        assert result.attempted > 0, f"{name} lost its docstring examples"


def test_listed_modules_exist():
    assert set(WITH_EXAMPLES) <= set(_modules())
    # and the list is every module with examples, so that none loses them unnoticed
    finder = doctest.DocTestFinder()
    with_examples = {name for name in _modules()
                     if any(t.examples for t in finder.find(importlib.import_module(name)))}
    assert with_examples == set(WITH_EXAMPLES), (
        f"modules with examples not in WITH_EXAMPLES: {sorted(with_examples - set(WITH_EXAMPLES))}")
