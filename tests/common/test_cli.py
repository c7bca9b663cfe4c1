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


@pytest.mark.parametrize("text, expected", [
    ("def get_config(:\n    pass\n", "cannot load the config file (invalid syntax at "),
    ("import nosuchmodule_xyz\n", "cannot load the config file (No module named 'nosuchmodule_xyz')"),
    ("X = 1\n", "cannot load the config file (it defines no get_config())"),
    ("def get_config():\n    raise ValueError('no such variant')\n",
     "cannot load the config file (ValueError: no such variant)"),
])
def test_a_config_file_that_fails_to_load_is_one_line_naming_it(text, expected, tmp_path):
    config = tmp_path / "mine.py"
    config.write_text(text)
    out = _script("finetune.py", f"--config={config}", tmp_path=tmp_path)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"FATAL Flags parsing error: --config={config}"), \
        out.stderr[-3000:]
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("flag", ["--config.train.num_steps=abc", "--workdri=x",
                                  "--on_config_chang=rerun"])
def test_absl_flag_errors_are_one_line_with_status_2_like_the_others(flag, tmp_path):
    out = _script("run_pipeline.py", "--config=configs/demo.py:tiny", flag, tmp_path=tmp_path)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("FATAL Flags parsing error: "), out.stderr
