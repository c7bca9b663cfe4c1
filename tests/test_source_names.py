"""Issue 12, kind 9: source names are arbitrary strings and survive every stage and file.

A skill column may hold ``c++``, ``a,b``, ``q&a/v2``, ``x+y`` or ``[draft] |2|``: no stage may join
names into one string and split it again. The whole pipeline (with fidelity and every final
fine-tune) runs on sources so named, and each file names them exactly.
"""

from __future__ import annotations

import json
import os

import pytest

from helpers import fixture
from jaxgrad.config import default_config
from jaxgrad.estimate.stage import read_estimates, subset_sources
from jaxgrad.pipeline import run_pipeline
from jaxgrad.pipeline.finetune import finetune_run_name, finetune_sources

NAMES = ["c++", "a,b", "q&a/v2", "x+y", "[draft] |2|"]
TARGET = "x+y"


def _config(path: str):
    c = default_config()
    c.model.name_or_path = fixture("tiny-llama")
    c.lora.rank = 2
    c.lora.alpha = 4.0
    c.data.kind = "files"
    c.data.files = dict(format="alpaca", path=path, target=TARGET, validation=2, test=2)
    c.train.batch_size = 4
    c.train.max_length = 32
    c.train.num_steps = 2
    c.train.warmup_steps = 0
    c.train.progress = False
    c.train.async_checkpoint = False
    c.gradients.projection_dim = 16
    c.gradients.batch_size = 8
    c.gradients.chunk_size = 4
    c.surrogate.num_subsets = 6
    c.surrogate.subset_size = 2
    c.selection.top = 2
    c.selection.n_boot = 20
    c.pipeline.finetune_steps = 1
    c.pipeline.finetune_runs = ("selection", "random")  # one run name logic for every run
    c.pipeline.fidelity = True
    c.fidelity.num_subsets = 1
    c.fidelity.steps = 1
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("names")
    path = str(d / "data.jsonl")
    with open(path, "w") as f:
        for i, name in enumerate(NAMES):
            for j in range(8):
                f.write(json.dumps({"instruction": f"{i}+{j}=", "input": "",
                                    "output": str(i + j), "skill": name}) + "\n")
    workdir = str(d / "run")
    config = _config(path)
    out = run_pipeline(config, workdir)
    return config, workdir, out


def test_every_stage_keeps_the_names(run):
    config, workdir, out = run
    selection = json.load(open(os.path.join(workdir, "selection", "selection.json")))
    assert sorted(selection["sources"]) == sorted(NAMES)
    assert set(selection["selected"]) <= set(NAMES) and len(selection["selected"]) == 2
    rows = read_estimates(os.path.join(workdir, "estimates", "estimates.csv"))
    for r in rows:
        assert len(r["source_list"]) == 2 and set(r["source_list"]) <= set(NAMES), r["sources"]
    runs = {"selection": selection["selected"], **selection["baselines"]}
    for name in config.pipeline.finetune_runs:
        done = json.load(open(os.path.join(workdir, "finetune", name, "sources.json")))
        assert done["sources"] == list(runs[name]), f"finetune {name}: names changed on the way"
    fid = json.load(open(os.path.join(workdir, "fidelity", "fidelity.json")))
    table = {int(r["subset"]): r["source_list"] for r in rows}
    for row in fid["rows"]:
        assert row["sources"] == table[row["subset"]]
    report = open(os.path.join(workdir, "report.md")).read()
    assert "| [draft] \\|2\\| |" in report or "[draft] \\|2\\|" in report, \
        "a '|' in a source name must be escaped in the report's tables"
    for name in NAMES:
        shown = json.dumps(name) if "," in name else name
        assert shown.replace("|", "\\|") in report, f"{name!r} missing from the report"


def test_subset_sources_reads_json_and_legacy_rows():
    assert subset_sources(json.dumps(["a,b", "x+y"])) == ["a,b", "x+y"]
    assert subset_sources("add+copy") == ["add", "copy"]  # run directories from before JSON
    assert subset_sources(["q&a/v2"]) == ["q&a/v2"]
    with pytest.raises(ValueError, match="JSON list of names"):
        subset_sources('[1, 2]')


def test_finetune_sources_and_run_names():
    assert finetune_sources({"sources": json.dumps(["a,b", "c++"])}, NAMES) == ["a,b", "c++"]
    assert finetune_sources({"sources": "c++, x+y"}, NAMES) == ["c++", "x+y"]
    with pytest.raises(ValueError, match="not one"):
        finetune_sources({"sources": '["a,b", '}, NAMES)
    assert finetune_run_name(["add", "copy"]) == "add+copy"
    odd = [finetune_run_name(s) for s in (["q&a/v2"], ["a,b"], ["a", "b"], ["a+b"], [".."])]
    assert all("/" not in n and n not in (".", "..") for n in odd), odd
    assert len(set(odd)) == len(odd), f"different source lists share a run directory: {odd}"


def test_kinds_as_pairs_for_names_a_config_cannot_key(tmp_path):
    """ml_collections refuses dots in keys, so a source named "v1.2" is labelled by a pair."""
    from jaxgrad.data import load_sources

    path = tmp_path / "d.jsonl"
    with open(path, "w") as f:
        for name in ("v1.2", "a,b", "t"):
            for j in range(6):
                f.write(json.dumps({"instruction": f"{name} {j}", "input": "", "output": str(j),
                                    "skill": name}) + "\n")
    config = _config(str(path))
    config.data.files.target = "t"
    config.data.files.kinds = [("v1.2", "related"), ("a,b", "unrelated")]
    from jaxgrad.data.sources import load_data

    data = load_data(config.data)
    assert data.kinds == {"v1.2": "related", "a,b": "unrelated", "t": "target"}
    with pytest.raises(ValueError, match="list of \\(source, kind\\) pairs"):
        load_sources({"format": "alpaca", "path": str(path), "target": "t", "kinds": ["v1.2"]})


def test_report_cells_keep_names_readable():
    from jaxgrad.pipeline.report import _name, _names

    assert _names(["ünï 名", "a,b"]) == '"ünï 名", "a,b"', "non-ASCII must not become \\u escapes"
    assert _names(["c++", "x+y"]) == "c++, x+y"
    assert _name(" lead ") == '" lead "' and _name("lead") == "lead"
    assert _name("a|b") == "a\\|b"
