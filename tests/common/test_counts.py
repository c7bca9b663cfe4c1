"""Issue 12, kind 10: "fraction or count" settings mean the same from Python, a config file or the
command line (where ml_collections turns ``2`` into ``2.0`` when the default is a float), under
one rule (jaxgrad.common.counts), checked for the whole config before the first stage starts
(tests/pipeline/test_validate.py)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from helpers import REPO
from jaxgrad.common.counts import RULE, check_fraction_or_count, fraction_or_count
from jaxgrad.estimate.subsets import subset_size
from jaxgrad.pipeline import validate_config


@pytest.mark.parametrize("two", [2, 2.0, "2", "2.0", np.int64(2), np.float32(2.0)])
def test_a_count_is_a_count_whatever_its_type(two):
    assert fraction_or_count(two, 10, name="x") == 2
    assert subset_size(10, two) == 2


def test_fractions_round_and_one_is_one():
    assert fraction_or_count(0.25, 10, name="x") == 2  # round(2.5) = 2, half to even
    assert fraction_or_count(0.35, 10, name="x") == 4
    assert fraction_or_count(1, 10, name="x") == fraction_or_count(1.0, 10, name="x") == 1
    assert fraction_or_count(0.01, 10, name="x", at_least_one=True) == 1
    assert fraction_or_count(0.01, 10, name="x", allow_zero=True) == 0
    assert fraction_or_count(0, 10, name="x", allow_zero=True) == 0
    assert fraction_or_count(10, 10, name="x") == 10


@pytest.mark.parametrize("bad,err,says", [
    (2.5, ValueError, "not a whole number"), (-1, ValueError, RULE), (0, ValueError, "not 0"),
    (math.nan, ValueError, RULE), (True, TypeError, "bool"), ("two", TypeError, "'two'"),
    (None, TypeError, "NoneType"), (11, ValueError, "asks for 11 of only 10")])
def test_bad_values_are_named_and_explained(bad, err, says):
    with pytest.raises(err) as info:
        fraction_or_count(bad, 10, name="config.selection.top")
    msg = str(info.value)
    assert "config.selection.top" in msg and says in msg, msg
    if "of only" not in msg:
        assert msg.count("fraction") == 1, f"one statement of the rule, not two: {msg}"


def _cli(*overrides):
    argv = ["prog", f"--config={os.path.join(REPO, 'configs', 'demo.py')}:tiny", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config


def test_command_line_counts_mean_what_python_counts_mean():
    config = _cli("--config.selection.top=2", "--config.surrogate.subset_size=1")
    assert isinstance(config.selection.top, float), "ml_collections keeps the float type"
    validate_config(config)
    n = 3  # sources of demo.py:tiny
    assert subset_size(n, config.selection.top) == subset_size(n, 2) == 2
    assert subset_size(n, config.surrogate.subset_size) == 1


def test_check_without_a_total():
    assert check_fraction_or_count("0.5", name="x") == 0.5
    assert check_fraction_or_count(3.0, name="x") == 3 and isinstance(
        check_fraction_or_count(3.0, name="x"), int)
