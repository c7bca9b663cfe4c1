"""jaxgrad.data.sources: the layouts (generic, alpaca, flan, cot) and their columns, sources named
by a column or by the file, several files, every missing file named at once, unknown names
refused listing the choices, and kinds given as (source, kind) pairs."""

from __future__ import annotations

import json

import pytest

from helpers.data import GENERIC, source_rows, write_rows
from helpers.runs import names_config
from jaxgrad.data import examples as E, sources as S


def test_answer_column_and_explicit_source(tmp_path):
    path = write_rows(source_rows(4, ("a",)), tmp_path / "d.jsonl")
    spec = {"format": "generic", "path": path, "columns": {"answer": "label", "source": None},
            "source": "mine", "validation": 1, "test": 1}
    data = S.load_sources(spec)
    assert data.sources == ["mine"], "`source` should name every row's source"
    exs = data.examples("train") + data.examples("validation") + data.examples("test")
    assert sorted(e["answer"] for e in exs) == ["0", "0", "1", "2"], "answers come from `label`"
    assert data.answer_format == "full"
    assert data.extract_answer("  7 \n") == "7"


def test_source_defaults_to_file_stem_and_files_combine(tmp_path):
    p1 = write_rows(source_rows(5, ("x",)), tmp_path / "first.jsonl")
    p2 = write_rows(source_rows(5, ("y",)), tmp_path / "second.csv")
    data = S.load_sources({"format": "generic", "path": [p1, p2], "columns": {"source": None},
                           "validation": 1, "test": 1})
    assert data.sources == ["first", "second"], "without a source column the file stem names it"
    for name, prefix in (("first", "x"), ("second", "y")):  # each file's rows, all of them
        exs = [e for split in ("train", "validation", "test") for e in data.examples(split, [name])]
        assert sorted(e["prompt"] for e in exs) == [f"{prefix} prompt {i}" for i in range(5)], name


def test_comma_separated_paths_read_as_a_list(tmp_path):
    """A command line gives several files as one comma-separated string (issue 16, item 5)."""
    p1 = write_rows(source_rows(5, ("x",)), tmp_path / "first.jsonl")
    p2 = write_rows(source_rows(5, ("y",)), tmp_path / "second.csv")
    data = S.load_sources({"format": "generic", "path": f"{p1},{p2}", "columns": {"source": None},
                           "validation": 1, "test": 1})
    assert data.sources == ["first", "second"]
    # an existing name is never split
    odd = write_rows(source_rows(5, ("z",)), tmp_path / "a,b.jsonl")
    assert S.load_sources({"format": "generic", "path": odd, "columns": {"source": None},
                           "validation": 1, "test": 1}).sources == ["a,b"]


def test_any_column_role_settable_on_a_shipped_config(tmp_path):
    """issue 16, item 5: data.files from configs holds every column role ("" = the format's
    default), so --config.data.files.columns.source=task works on a locked config."""
    from jaxgrad.config import files_section

    path = write_rows(source_rows(10), tmp_path / "d.jsonl")
    files = files_section(format="generic", path=path, validation=2, test=2, source="",
                          hub="", hub_config="", file_type="", answer_format="")
    files.lock()
    files.columns.source = "task"  # what the command-line flag does
    spec = {k: (None if v == "" else v) for k, v in files.to_dict().items()}
    assert S.load_sources(spec).sources == ["alpha", "beta", "gamma"]
    files.format = "alpaca"  # the roles of other formats left at "" are not refused
    with pytest.raises(ValueError, match="missing column 'instruction'"):
        S.load_sources({k: (None if v == "" else v) for k, v in files.to_dict().items()})


def test_every_missing_file_named_at_once(tmp_path):
    """issue 16, item 5: a config naming several files that are not there (the CoT config before
    its data are fetched) gets one error listing them all."""
    p1 = write_rows(source_rows(5, ("x",)), tmp_path / "first.jsonl")
    with pytest.raises(FileNotFoundError) as info:
        S.load_sources({**GENERIC, "path": [p1, str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]})
    msg = str(info.value)
    assert "a.jsonl" in msg and "b.jsonl" in msg and "2 of the 3" in msg, msg


def test_alpaca_layout(tmp_path):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "skill": "math"},
            {"instruction": "Say hi.", "input": "", "output": "hi", "skill": "chat"}] * 3
    path = write_rows(rows, tmp_path / "alpaca.json")
    exs = S.read_examples({"format": "alpaca", "path": path})
    assert exs[0]["source"] == "math" and exs[1]["source"] == "chat"
    assert exs[0]["prompt"] == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert exs[1]["prompt"] == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"), \
        "an empty input must use the template without the Input block"
    assert exs[0]["completion"] == "5"


def test_flan_layout(tmp_path):
    rows = [{"inputs": "Translate: cat", "targets": "chat", "_task_name": "wmt"},
            {"inputs": "Question: why", "targets": "because", "_task_name": "qa"},
            {"inputs": "Answer this\n", "targets": "ok", "_task_name": "qa"}]
    exs = S.read_examples({"format": "flan", "path": write_rows(rows, tmp_path / "flan.parquet")})
    assert [e["prompt"] for e in exs] == ["Translate: cat\n", "Question: why\n", "Answer this\n"]
    rows[0]["inputs"] = "Translate:"
    exs = S.read_examples({"format": "flan", "path": write_rows(rows, tmp_path / "flan2.jsonl")})
    assert exs[0]["prompt"] == "Translate:", "inputs ending in ':' get no newline"
    assert [e["source"] for e in exs] == ["wmt", "qa", "qa"]


def test_cot_layout_and_answer_extraction(tmp_path):
    rows = [{"question": f"Is {i} even?", "rationale": f"{i} mod 2 is {i % 2}.",
             "answer": "yes" if i % 2 == 0 else "no"} for i in range(10)]
    data = S.load_sources({"format": "cot", "path": write_rows(rows, tmp_path / "parity_qa.jsonl"),
                           "validation": 2, "test": 2, "target": "parity_qa"})
    assert data.target == "parity_qa" and data.kinds == {"parity_qa": "target"}
    for e in data.examples("train"):
        assert e["completion"].endswith(f"Therefore, the answer is {e['answer']}.")
        assert data.extract_answer(e["completion"]) == e["answer"], e["completion"]
    assert E.extract_cot_answer("so the answer is 42.\nQ: next question") == "42"
    assert E.extract_cot_answer("no conclusion") is None


def test_unknown_names_fail_listing_choices(tmp_path):
    path = write_rows(source_rows(3), tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match="generic, alpaca, flan, cot"):
        S.load_sources({"format": "sharegpt", "path": path})
    with pytest.raises(ValueError, match="json, jsonl, csv, tsv, parquet, pickle"):
        S.load_sources({"format": "generic", "path": path, "file_type": "xml"})
    with pytest.raises(ValueError, match="unknown keys \\['colums'\\]"):
        S.load_sources({"format": "generic", "path": path, "colums": {}})
    with pytest.raises(ValueError, match="target 'delta' is not one of the sources"):
        S.load_sources(dict(GENERIC, path=path, validation=0, test=0, target="delta"))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        S.load_sources({"format": "generic", "path": str(tmp_path / "nope.jsonl")})


def test_kinds_as_pairs_for_names_a_config_cannot_key(tmp_path):
    """ml_collections refuses dots in keys, so a source named "v1.2" is labelled by a pair."""
    from jaxgrad.data import load_sources

    path = tmp_path / "d.jsonl"
    with open(path, "w") as f:
        for name in ("v1.2", "a,b", "t"):
            for j in range(6):
                f.write(json.dumps({"instruction": f"{name} {j}", "input": "", "output": str(j),
                                    "skill": name}) + "\n")
    config = names_config(str(path))
    config.data.files.target = "t"
    config.data.files.kinds = [("v1.2", "related"), ("a,b", "unrelated")]
    from jaxgrad.data.sources import load_data

    data = load_data(config.data)
    assert data.kinds == {"v1.2": "related", "a,b": "unrelated", "t": "target"}
    with pytest.raises(ValueError, match="list of \\(source, kind\\) pairs"):
        load_sources({"format": "alpaca", "path": str(path), "target": "t", "kinds": ["v1.2"]})
