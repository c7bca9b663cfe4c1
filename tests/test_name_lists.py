"""Config keys holding lists of names (jaxgrad.config.NAME_LISTS) as typed on a command line.

ml_collections hands ``--config.data.synthetic.tasks=add,sub`` to a tuple-valued key as the
one-element tuple ``("add,sub",)``. Readers split it (common.checks.as_names), and the stage
fingerprints must compare the names too: the same list in another spelling is not a config
change (it was: a run directory asked for a rerun from meta_train on, with identical results).
"""

from __future__ import annotations

import os

import pytest
from absl import flags
from ml_collections import config_flags

from configs import demo
from jaxgrad.common.checks import as_names
from jaxgrad.config import NAME_LISTS
from jaxgrad.pipeline.fingerprint import flatten_config, stage_fingerprints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _from_command_line(*overrides: str):
    argv = ["prog", f"--config={os.path.join(ROOT, 'configs', 'demo.py')}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config


def _fingerprints(config) -> dict[str, str]:
    return {s: f.fingerprint for s, f in stage_fingerprints(config).items()}


@pytest.mark.parametrize("overrides", [
    ("--config.data.synthetic.tasks=add,sub,add_digit",),
    ("--config.data.synthetic.tasks=add, sub, add_digit", "--config.data.synthetic.noisy=add,sort"),
    ("--config.lora.target_modules=q_proj, k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,"
     "lm_head",),
])
def test_the_same_names_typed_on_a_command_line_keep_every_fingerprint(overrides):
    typed = _from_command_line(*overrides)
    assert _fingerprints(typed) == _fingerprints(demo.get_config())


def test_other_names_change_the_fingerprint():
    typed = _from_command_line("--config.data.synthetic.tasks=add,sub")
    changed = [s for s, f in _fingerprints(typed).items()
               if f != _fingerprints(demo.get_config())[s]]
    assert "meta_train" in changed and "base" not in changed, changed


def test_name_lists_are_keys_of_the_default_config():
    flat = flatten_config(demo.get_config())
    missing = [k for k in NAME_LISTS if k not in flat]
    assert not missing, f"NAME_LISTS names keys the config does not have: {missing}"


def test_as_names_splits_every_spelling():
    assert as_names("add, sub") == as_names(("add,sub",)) == as_names(["add", " sub", ""]) == (
        "add", "sub")
    assert as_names(None) is None
