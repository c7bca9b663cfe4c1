"""Errors found before any stage runs, as one line naming the setting (new-user trial): values the
stages' typed configs refuse (``--config.train.learning_rate=-1`` ran the base stage, then a
32-line traceback), ``--stages=foo``, and scripts/finetune.py's selection file and missing base."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from configs import demo
from jaxgrad.config import ConfigError
from jaxgrad.pipeline import run_pipeline, validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("key, value, message", [
    ("train.learning_rate", -1.0, "config.train.learning_rate must be >= 0, got -1.0"),
    ("train.batch_size", 0, "config.train.batch_size must be an int >= 1, got 0"),
    ("train.max_grad_norm", -0.5, "config.train.max_grad_norm must be >= 0"),
    ("lora.dropout", 1.5, "config.lora.dropout must be in [0, 1)"),
    ("base.learning_rate", -1.0, "config.base.learning_rate must be >= 0"),
    ("gradients.batch_size", 0, "config.gradients.batch_size must be a whole number >= 1"),
    ("gradients.projection_dim", 0, "config.gradients.projection_dim must be a whole number in"),
    ("surrogate.num_subsets", 0, "config.surrogate.num_subsets must be a whole number >= 1"),
    ("fidelity.num_subsets", 0, "config.fidelity.num_subsets must be >= 1"),
])
def test_values_a_stage_would_refuse_are_refused_before_any_stage(tmp_path, key, value, message):
    config = demo.get_config("tiny")
    config.pipeline.fidelity = True
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError) as e:
        validate_config(config)
    assert message in str(e.value)
    with pytest.raises(ConfigError):
        run_pipeline(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists(), "something ran before the refusal"


def test_an_unknown_stage_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"--stages: unknown pipeline stages \['foo'\]"):
        run_pipeline(demo.get_config("tiny"), str(tmp_path / "run"), ["base", "foo"])


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", name), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


def _one_line(out: subprocess.CompletedProcess, *expected: str) -> None:
    """Exit status 2 and one line on stderr holding every ``expected`` text."""
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert len(lines) == 1 and all(e in lines[0] for e in expected), out.stderr[-3000:]


def test_run_pipeline_script_with_an_unknown_stage(tmp_path):
    out = _script("run_pipeline.py", "--config=configs/demo.py:tiny",
                  f"--workdir={tmp_path / 'run'}", "--stages=base,foo")
    _one_line(out, "unknown pipeline stages ['foo']", "expected some of ['base', ")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["no_base", "missing_file", "malformed_json", "learning_rate"])
def test_finetune_script_refusals_are_one_line_before_the_model_loads(tmp_path, case):
    bad = tmp_path / "selection.json"
    bad.write_text('{"selected": [\n')  # cut short: read as names per line it gave ['{']
    workdir = tmp_path / "run"
    scratch = ["--config.base.pretrain=False"]  # a from-scratch model needs no base/
    args, expected = {
        "no_base": ([], ["--workdir=", "has no pretrained base", "--stages=base"]),
        "missing_file": (scratch + ["--config.finetune.selection_file=/nope.json"],
                         ["config.finetune.selection_file=/nope.json: no such file; expected a "
                          "JSON object with a 'selected'"]),
        "malformed_json": (scratch + [f"--config.finetune.selection_file={bad}"],
                           [f"config.finetune.selection_file={bad}: not valid JSON",
                            "expected a JSON object with a 'selected'"]),
        "learning_rate": (scratch + ["--config.finetune.sources=add",
                                     "--config.train.learning_rate=-1"],
                          ["config.train.learning_rate must be >= 0, got -1.0"]),
    }[case]
    out = _script("finetune.py", "--config=configs/demo.py:tiny", f"--workdir={workdir}", *args)
    _one_line(out, *expected)
    assert "devices:" not in out.stdout, "the refusal came after JAX started"
    assert not (workdir / "finetune").exists(), "a fine-tune directory was written"


def test_selection_file_forms(tmp_path):
    """What selection_file accepts still reads as before; JSON of the wrong shape is refused."""
    from jaxgrad.pipeline.finetune import finetune_sources

    available = ["add", "copy"]
    path = tmp_path / "s.json"
    for text, names in (('{"selected": ["copy"], "sources": ["add", "copy"]}', ["copy"]),
                        ('["add"]', ["add"]), ("add\ncopy\n", ["add", "copy"])):
        path.write_text(text)
        assert finetune_sources({"selection_file": str(path)}, available) == names
    for text in ('{"selected": "add"}', "[1, 2]", '[" add",'):
        path.write_text(text)
        with pytest.raises(ConfigError, match="config.finetune.selection_file="):
            finetune_sources({"selection_file": str(path)}, available)
    path.write_text(json.dumps({"selected": ["sub"]}))
    with pytest.raises(ConfigError, match=r"unknown sources \['sub'\]"):
        finetune_sources({"selection_file": str(path)}, available)
