"""jaxgrad.pipeline.validate: a config is checked whole before any stage starts (counts, targets,
dtypes, misspelt keys, values outside their set, full fine-tuning with adapters), each refusal a
ConfigError naming the key; data that changed under the same config is caught by
data_splits.json, or by the gradient stores of run directories from before it."""

from __future__ import annotations

import os
import shutil

import pytest
from helpers import assert_one_line_refusal, run_script

from configs import demo
from jaxgrad.config import ConfigError
from jaxgrad.pipeline import (
    FRACTION_OR_COUNT,
    ConfigChangedError,
    run_pipeline,
    validate_config,
)


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


def test_a_config_without_target_is_refused_before_any_stage(tmp_path):
    config = demo.get_config("tiny")
    config.data.synthetic.target = ""
    with pytest.raises(ValueError, match="config.data.synthetic.target is not set"):
        run_pipeline(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_an_unsupported_dtype_is_refused_before_any_stage(tmp_path):
    config = demo.get_config("tiny")
    config.model.dtype = "float16"
    with pytest.raises(ValueError, match="config.model.dtype='float16' is not supported"):
        run_pipeline(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_changed_data_under_the_same_config_is_caught(run_dir, tmp_path):
    """The config fingerprints cannot see data that changed under the same config (an edited
    file, another way of reading it); data_splits.json does, before any stage reuses artefacts."""
    from jaxgrad.data.sources import load_data
    from jaxgrad.pipeline import check_data_splits
    from jaxgrad.rundir import SPLITS_FILE

    workdir = str(tmp_path / "run")
    shutil.copytree(run_dir, workdir)
    assert os.path.isfile(os.path.join(workdir, SPLITS_FILE))
    data = load_data(demo.get_config("tiny").data)
    check_data_splits(workdir, data, "error")  # the same data: nothing to say
    changed = data.with_label_noise([data.sources[0]], seed=1, prefix="changed_")
    with pytest.raises(ConfigChangedError, match="the data changed") as e:
        check_data_splits(workdir, changed, "error")
    assert e.value.stage == "meta_train"
    assert os.path.isdir(os.path.join(workdir, "meta_train")), "error mode deletes nothing"
    check_data_splits(workdir, changed, "rerun")
    assert not os.path.exists(os.path.join(workdir, "meta_train"))
    assert not os.path.exists(os.path.join(workdir, "gradients"))
    assert os.path.isfile(os.path.join(workdir, "base", "model.safetensors")), "base kept"
    check_data_splits(workdir, changed, "error")  # recorded: the new data is now the run's


def test_a_run_directory_from_before_data_splits_is_checked_by_its_stores(run_dir, tmp_path):
    """Without data_splits.json the gradient stores' example ids tell whether the data changed."""
    from jaxgrad.data.sources import load_data
    from jaxgrad.pipeline import check_data_splits
    from jaxgrad.rundir import SPLITS_FILE

    data = load_data(demo.get_config("tiny").data)
    changed = data.with_label_noise([data.sources[0]], seed=1, prefix="changed_")
    for d, expect_error in ((data, False), (changed, True)):
        workdir = str(tmp_path / f"run{int(expect_error)}")
        shutil.copytree(run_dir, workdir)
        os.remove(os.path.join(workdir, SPLITS_FILE))
        if expect_error:
            with pytest.raises(ConfigChangedError, match="the data changed"):
                check_data_splits(workdir, d, "error")
        else:
            check_data_splits(workdir, d, "error")  # adopted: the stores hold these examples
            assert os.path.isfile(os.path.join(workdir, SPLITS_FILE))


def test_unknown_selection_method_refused_before_any_stage(tmp_path):
    config = demo.get_config("tiny")
    config.selection.method = "best"
    with pytest.raises(ValueError, match="config.selection.method must be one of"):
        run_pipeline(config, str(tmp_path / "run"))


def test_misspelt_keys_and_values_outside_their_set_refused_before_any_stage(tmp_path):
    """A misspelt key of a method section would be ignored (its default used) and a value
    outside an option's set would take another branch: both are refused, all at once."""
    config = demo.get_config("tiny")
    config.surrogate.num_subset = 3
    config.selection.topp = 0.3
    config.surrogate.mode = "exct"
    config.gradients.output_fn = "logits"
    config.pipeline.finetune_runs = ("selection", "alll")
    # every other section too (issue 16, item 3): read late by their stages, or never
    config.train.lerning_rate = 0.1
    config.lora.rnak = 2
    config.data.synthetic.n_trian = 5
    config.mesh.dta = 2
    config.finetune.nmae = "x"
    config.trian = 1
    with pytest.raises(ValueError) as e:
        run_pipeline(config, str(tmp_path / "run"))
    msg = str(e.value)
    for want in ("config.train.lerning_rate is not a key of config.train (did you mean "
                 "train.learning_rate?)", "config.lora.rnak is not a key", "(did you mean lora.rank?)",
                 "config.data.synthetic.n_trian is not a key", "config.mesh.dta is not a key",
                 "config.finetune.nmae is not a key", "config.trian is not a key of config (did "
                 "you mean train?)","config.surrogate.num_subset is not a key of config.surrogate (did you mean "
                 "surrogate.num_subsets?)", "config.selection.topp is not a key",
                 "config.surrogate.mode must be one of ('linearized', 'exact'), got 'exct'",
                 "config.gradients.output_fn must be one of", "unknown runs ['alll']"):
        assert want in msg, f"{want!r} not in:\n{msg}"
    assert not os.path.exists(tmp_path / "run")


def test_full_finetune_with_adapters_refused_before_any_stage(tmp_path):
    """train.full_finetune=True meta-trains every parameter, but with adapters on the model the
    gradients, estimates and fidelity stages differentiate w.r.t. the adapters only: refused by
    name before anything is written; without adapters (lora.rank=0) it is accepted."""
    config = demo.get_config("tiny")
    config.train.full_finetune = True
    with pytest.raises(ValueError, match=r"config.train.full_finetune=True with "
                                         r"config.lora.rank=16.*set lora.rank=0"):
        run_pipeline(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")
    config.lora.rank = 0
    from jaxgrad.pipeline import validate_config

    assert validate_config(config, stages=["base"]) is None


def test_config_error_is_a_value_error_raised_by_run_pipeline(tmp_path):
    from configs import demo
    from jaxgrad.config import ConfigError
    from jaxgrad.pipeline import run_pipeline

    config = demo.get_config("tiny")
    config.pipeline.finetune_runs = ("al",)
    with pytest.raises(ConfigError, match="unknown runs"):
        run_pipeline(config, str(tmp_path / "run"))
    assert issubclass(ConfigError, ValueError)


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


def test_run_pipeline_script_with_an_unknown_stage(tmp_path):
    out = run_script("run_pipeline.py", "--config=configs/demo.py:tiny",
                  f"--workdir={tmp_path / 'run'}", "--stages=base,foo")
    assert_one_line_refusal(out, "unknown pipeline stages ['foo']", "expected some of ['base', ")
    assert not (tmp_path / "run").exists()
