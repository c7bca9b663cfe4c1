"""Issue 12, kind 10: "fraction or count" settings mean the same from Python, a config file or the
command line (where ml_collections turns ``2`` into ``2.0`` when the default is a float), under
one rule (jaxgrad.common.counts), checked for the whole config before the first stage starts."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import demo
from jaxgrad.common.counts import RULE, check_fraction_or_count, fraction_or_count
from jaxgrad.pipeline import FRACTION_OR_COUNT, run_pipeline, validate_config
from jaxgrad.estimate.subsets import subset_size
from jaxgrad.select.scores import select_top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_select_top_follows_the_rule():
    scores = np.array([0.1, 0.9, 0.5, np.nan, 0.7])
    np.testing.assert_array_equal(select_top(scores, 2.0), select_top(scores, 2))
    np.testing.assert_array_equal(select_top(scores, 0.5), [1, 4])  # half of the 4 scored


def _cli(*overrides):
    argv = ["prog", f"--config={os.path.join(ROOT, 'configs', 'demo.py')}:tiny", *overrides]
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


def test_every_listed_setting_is_checked_before_any_stage(tmp_path):
    for key in FRACTION_OR_COUNT:
        config = demo.get_config("tiny")
        if key.startswith("data.files"):
            config.data.kind = "files"
            config.data.files = dict(format="alpaca", path=str(tmp_path / "none.jsonl"),
                                     validation=0.1, test=0.1)
        section, field = key.rsplit(".", 1)
        node = config
        for part in section.split("."):
            node = node[part]
        node[field] = 2.5
        workdir = tmp_path / key
        with pytest.raises(ValueError, match=f"config.{key}.*not a whole number"):
            run_pipeline(config, str(workdir))
        assert not workdir.exists() or not os.listdir(workdir), f"{key}: a stage started"


def test_a_count_above_the_sources_is_refused_before_any_stage(tmp_path):
    config = demo.get_config("tiny")
    config.selection.top = 5
    with pytest.raises(ValueError, match="config.selection.top=5 asks for 5 of only 3"):
        run_pipeline(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_check_without_a_total():
    assert check_fraction_or_count("0.5", name="x") == 0.5
    assert check_fraction_or_count(3.0, name="x") == 3 and isinstance(
        check_fraction_or_count(3.0, name="x"), int)


def test_a_config_without_target_is_refused_before_any_stage(tmp_path):
    config = demo.get_config("tiny")
    config.data.synthetic.target = ""
    with pytest.raises(ValueError, match="config.data.synthetic.target is not set"):
        run_pipeline(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_config_file_counts_take_a_fraction_from_the_command_line():
    """configs/smollm2_bigbench.py writes validation=100 (a count); ml_collections would lock the
    field to int and refuse --config.data.files.validation=0.1 (files_section holds floats)."""
    argv = ["prog", f"--config={os.path.join(ROOT, 'configs', 'smollm2_bigbench.py')}",
            "--config.data.files.validation=0.1", "--config.data.files.test=30"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, sys_argv=argv)
    fv(argv)
    assert fv.config.data.files.validation == 0.1 and fv.config.data.files.test == 30


def test_two_and_two_point_zero_have_one_fingerprint():
    from jaxgrad.pipeline.fingerprint import stage_fingerprints

    a, b = demo.get_config("tiny"), demo.get_config("tiny")
    a.selection.top, b.selection.top = 2, 2.0
    assert stage_fingerprints(a)["selection"].fingerprint == \
        stage_fingerprints(b)["selection"].fingerprint


def test_an_unsupported_dtype_is_refused_before_any_stage(tmp_path):
    config = demo.get_config("tiny")
    config.model.dtype = "float16"
    with pytest.raises(ValueError, match="config.model.dtype='float16' is not supported"):
        run_pipeline(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
