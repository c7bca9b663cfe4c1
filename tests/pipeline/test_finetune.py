"""jaxgrad.pipeline.finetune: the final fine-tunes (the meta-training stage's θ* fine-tuned on the
selection, the baselines or named sources), which sources a run trains on and its directory's
name, reusing a finished fine-tune only under the settings it was made with, finetune_seed, and a
baseline that picks the selection's sources trained once."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil

import numpy as np
import pytest
from flax import nnx
from helpers import assert_one_line_refusal, run_script
from helpers.runs import NAMES, file_mtimes
from helpers.training import config_module, leaves_dict

from configs import demo
from jaxgrad.config import ConfigError, ModelSpec
from jaxgrad.models.loading import load_model
from jaxgrad.pipeline import ConfigChangedError, run_pipeline
from jaxgrad.pipeline.finetune import finetune_run_name, finetune_sources


def test_finetune_runs_typed_as_a_comma_list_add_a_run(run_dir, tmp_path):
    """`--config.pipeline.finetune_runs=selection,random` arrives from ml_collections as the
    tuple ("selection,random",): it names two runs (it was refused as one unknown run), and the
    missing one is trained."""
    workdir = str(tmp_path / "run")
    shutil.copytree(run_dir, workdir)
    shutil.rmtree(os.path.join(workdir, "finetune", "random"))
    config = demo.get_config("tiny")
    config.pipeline.finetune_runs = ("selection, random",)
    results = run_pipeline(config, workdir, stages=["finetune"])["finetune"]
    assert sorted(results) == ["random", "selection"], sorted(results)
    assert os.path.isfile(os.path.join(workdir, "finetune", "random", "sources.json"))


def test_finetune_seed_changes_the_final_finetunes_only(run_dir, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(run_dir, workdir)
    config = demo.get_config("tiny")
    config.pipeline.finetune_seed = 5
    config.pipeline.finetune_runs = ("all",)
    config.pipeline.on_config_change = "rerun"
    before = file_mtimes(workdir)
    run_pipeline(config, workdir)
    after = file_mtimes(workdir)
    assert after["selection/selection.json"] == before["selection/selection.json"]
    old = json.load(open(os.path.join(run_dir, "finetune", "all", "sources.json")))
    new = json.load(open(os.path.join(workdir, "finetune", "all", "sources.json")))
    assert new["sources"] == old["sources"]
    assert new["metrics"]["test_loss"] != old["metrics"]["test_loss"], \
        "another finetune_seed gave the same fine-tune"
    saved = json.load(open(os.path.join(workdir, "finetune", "all", "config.json")))
    assert saved["train"]["seed"] == 5 and saved["lora"]["seed"] == 5


def test_a_baseline_with_the_selections_sources_is_not_trained_twice(run_dir, tmp_path):
    """issue 16, item 6: when a baseline picks exactly the selection's sources, the final
    fine-tune (deterministic under one seed) is recorded for it, not trained a second time."""
    workdir = str(tmp_path / "run")
    shutil.copytree(run_dir, workdir)
    path = os.path.join(workdir, "selection", "selection.json")
    selection = json.load(open(path))
    selection["baselines"]["random"] = list(reversed(selection["selected"]))
    json.dump(selection, open(path, "w"))
    shutil.rmtree(os.path.join(workdir, "finetune", "random"))
    run_pipeline(demo.get_config("tiny"), workdir, stages=["finetune", "report"])
    twin = json.load(open(os.path.join(workdir, "finetune", "random", "sources.json")))
    first = json.load(open(os.path.join(workdir, "finetune", "selection", "sources.json")))
    assert twin["same_as"] == "selection" and twin["metrics"] == first["metrics"]
    assert os.listdir(os.path.join(workdir, "finetune", "random")) == ["sources.json"], \
        "nothing was trained for the twin"
    assert "| random (= selection: the same sources, trained once) |" in \
        open(os.path.join(workdir, "report.md")).read()


def test_finetune_sources_and_run_names():
    assert finetune_sources({"sources": json.dumps(["a,b", "c++"])}, NAMES) == ["a,b", "c++"]
    assert finetune_sources({"sources": "c++, x+y"}, NAMES) == ["c++", "x+y"]
    with pytest.raises(ValueError, match="not one"):
        finetune_sources({"sources": '["a,b", '}, NAMES)
    assert finetune_run_name(["add", "copy"]) == "add+copy"
    odd = [finetune_run_name(s) for s in (["q&a/v2"], ["a,b"], ["a", "b"], ["a+b"], [".."])]
    assert all("/" not in n and n not in (".", "..") for n in odd), odd
    assert len(set(odd)) == len(odd), f"different source lists share a run directory: {odd}"


def test_meta_train_and_finetune_stages_on_tiny_demo(tmp_path):
    """The stages end to end on configs/demo.py:tiny: run layout, PEFT adapter round trip, the
    selection-file path of finetune and its test-split metrics."""
    from jaxgrad.models import load_peft_adapter
    from jaxgrad.pipeline.finetune import finetune
    from jaxgrad.train.stage import meta_train

    config = config_module("demo").get_config("tiny")
    result = meta_train(config, str(tmp_path))
    run = tmp_path / "meta_train"
    assert {"ckpt", "metrics.jsonl", "adapter", "config.json"} <= set(os.listdir(run))
    assert {"val_loss/add", "val_loss/copy", "val_acc/add"} <= set(result.metrics)
    fresh, _ = load_model(ModelSpec.from_config(config.model), None)
    load_peft_adapter(fresh, str(run / "adapter"))
    ours, theirs = (leaves_dict(nnx.state(m, nnx.LoRAParam)) for m in (result.model, fresh))
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_array_equal(theirs[k], ours[k], err_msg=f"adapter round trip: {k}")

    (tmp_path / "selected.json").write_text(json.dumps({"sources": ["copy"]}))
    config.finetune.selection_file = str(tmp_path / "selected.json")
    result = finetune(config, str(tmp_path))
    summary = json.loads((tmp_path / "finetune" / "copy" / "sources.json").read_text())
    assert summary["sources"] == ["copy"]
    assert {"test_loss", "test_loss/add", "val_loss/add"} <= set(summary["metrics"])
    assert "val_loss/copy" not in summary["metrics"], "finetune must validate on the target only"

    # issue 16, item 2: a fine-tune is reused only under the settings it was made with; a finished
    # one is returned as recorded: nothing trained, evaluated or appended to metrics.jsonl again
    metrics_file = tmp_path / "finetune" / "copy" / "metrics.jsonl"
    rows = metrics_file.read_text()
    again = finetune(config, str(tmp_path))
    assert again.step == result.step and again.metrics == summary["metrics"]
    assert metrics_file.read_text() == rows, "a reused fine-tune must not append metrics rows"
    got = leaves_dict(nnx.state(again.model, nnx.LoRAParam))
    want = leaves_dict(nnx.state(result.model, nnx.LoRAParam))
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"reused adapter: {k}")
    cases = [("train.learning_rate", lambda c: setattr(c.train, "learning_rate", 0.5)),
             ("lora.rank", lambda c: setattr(c.lora, "rank", 2)),
             ("finetune.units", lambda c: (setattr(c.finetune, "selection_file", ""),
                                           setattr(c.finetune, "sources", "add"),
                                           setattr(c.finetune, "name", "copy")))]
    for key, change in cases:
        changed = copy.deepcopy(config)
        change(changed)
        before = (tmp_path / "finetune" / "copy" / "config.json").read_text()
        with pytest.raises(ConfigChangedError, match=re.escape(key)):
            finetune(changed, str(tmp_path))
        assert (tmp_path / "finetune" / "copy" / "config.json").read_text() == before, \
            f"a refused fine-tune ({key}) must leave the old run as it was"
    changed = copy.deepcopy(config)
    changed.train.learning_rate = 0.5
    changed.pipeline.on_config_change = "rerun"
    finetune(changed, str(tmp_path))
    run_record = json.loads((tmp_path / "finetune" / "copy" / "run.json").read_text())
    assert run_record["values"]["train.learning_rate"] == 0.5


def test_finetune_sources_from_a_selection_file(tmp_path):
    """selection_file: the selection stage's selection.json gives its "selected" list (not the
    "sources" list, which names every source), a {"sources": [...]} object its list, a JSON list
    or one name per line as they are; unknown names and empty choices are refused."""
    from jaxgrad.pipeline.finetune import finetune_sources

    available = ["add", "copy", "noisy_add"]
    stage_output = tmp_path / "selection.json"
    stage_output.write_text(json.dumps({"sources": available, "selected": ["copy"]}))
    assert finetune_sources({"selection_file": str(stage_output)}, available) == ["copy"]
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"sources": ["add", "copy"]}))
    assert finetune_sources({"selection_file": str(plain)}, available) == ["add", "copy"]
    lines = tmp_path / "names.txt"
    lines.write_text("noisy_add\n\nadd\n")
    assert finetune_sources({"selection_file": str(lines)}, available) == ["noisy_add", "add"]
    assert finetune_sources({"sources": "add, copy"}, available) == ["add", "copy"]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"chosen": ["add"]}))
    with pytest.raises(ValueError, match="needs a 'selected' or 'sources' list"):
        finetune_sources({"selection_file": str(other)}, available)
    with pytest.raises(ValueError, match=r"unknown sources \['sub'\]"):
        finetune_sources({"sources": "sub"}, available)
    with pytest.raises(ValueError, match="names no sources"):
        finetune_sources({"sources": ""}, available)


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
    out = run_script("finetune.py", "--config=configs/demo.py:tiny", f"--workdir={workdir}", *args)
    assert_one_line_refusal(out, *expected)
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
