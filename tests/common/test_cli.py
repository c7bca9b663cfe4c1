"""The scripts' flag parsing (jaxgrad.common.cli): what ml_collections raises as a chained
traceback, an override of a key the config lacks or a --config file that cannot be loaded, is one
line naming the flag and exit status 2, before any stage (new-user trial of issue 16)."""

import os
import subprocess
import sys

import pytest

from helpers import REPO

def _script(name, *args, tmp_path):
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", name), *args,
                           f"--workdir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.mark.parametrize("script", ["run_pipeline.py", "finetune.py", "estimate.py"])
def test_a_misspelt_override_key_is_one_line_with_the_flag_and_did_you_mean(script, tmp_path):
    out = _script(script, "--config=configs/demo.py:tiny", "--config.finetune.nme=x",
                  tmp_path=tmp_path)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert ("flag --config.finetune.nme: the config has no key 'nme' (did you mean 'name'?)"
            in out.stderr), out.stderr
    assert not (tmp_path / "run").exists()


def test_a_missing_section_in_an_override_names_the_missing_key(tmp_path):
    out = _script("run_pipeline.py", "--config=configs/demo.py:tiny",
                  "--config.train.num_steps=5", "--config.pipline.fidelity=True",
                  tmp_path=tmp_path)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "flag --config.pipline.fidelity: the config has no key 'pipline'" in out.stderr, \
        out.stderr
    assert "Traceback" not in out.stderr


def test_a_config_file_that_does_not_exist_is_one_line(tmp_path):
    out = _script("run_pipeline.py", "--config=configs/nope.py", tmp_path=tmp_path)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "--config=configs/nope.py: cannot load the config file" in out.stderr, out.stderr
    assert "No such file" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()
