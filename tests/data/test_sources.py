"""Tests of jaxgrad/data/sources.py: loaders for each file type and layout, splits, errors."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pandas as pd
import pytest

from jaxgrad.data import examples as E
from jaxgrad.data import multisource as M
from jaxgrad.data import sources as S


def _rows(n_per_source=10, names=("alpha", "beta", "gamma")):
    return [{"prompt": f"{name} prompt {i}", "completion": f"{name} completion {i}",
             "task": name, "label": str(i % 3)}
            for name in names for i in range(n_per_source)]


def _write(rows, path):
    kind = os.path.splitext(path)[1]
    if kind == ".jsonl":
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif kind == ".json":
        with open(path, "w") as f:
            json.dump(rows, f)
    elif kind == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif kind == ".tsv":
        pd.DataFrame(rows).to_csv(path, index=False, sep="\t")
    elif kind == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    elif kind == ".pkl":
        pd.DataFrame(rows).to_pickle(path)
    else:
        raise AssertionError(kind)
    return str(path)


GENERIC = {"format": "generic", "columns": {"source": "task"}, "validation": 2, "test": 0.2}


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".tsv", ".parquet"])
def test_generic_loader_reads_every_file_type(tmp_path, suffix):
    rows = _rows()
    path = _write(rows, tmp_path / f"data{suffix}")
    data = S.load_sources(dict(GENERIC, path=path))
    assert data.sources == ["alpha", "beta", "gamma"], "sources should be sorted without a config"
    got = {(e["source"], e["prompt"], e["completion"]) for split in E.SPLITS
           for e in data.examples(split)}
    want = {(r["task"], r["prompt"], r["completion"]) for r in rows}
    assert got == want, f"{suffix}: the loaded examples differ from the rows written"
    for name in data.sources:
        assert (data.n("train", name), data.n("validation", name), data.n("test", name)) == \
            (6, 2, 2), f"{name}: validation=2 and test=0.2 of 10 should give 6/2/2"
    assert all(e["answer"] is None for e in data.examples("train")), \
        "no answer column configured, so answers must be None"
    labels = {(r["prompt"], r["label"]) for r in rows}
    exs = S.read_examples(dict(GENERIC, path=path, columns={"source": "task", "answer": "label"}))
    assert {(e["prompt"], e["answer"]) for e in exs} == labels, \
        f"{suffix}: a column of digits is read as the text written"


def test_target_examples_are_the_targets_split(tmp_path):
    data = S.load_sources(dict(GENERIC, path=_write(_rows(), tmp_path / "data.jsonl"),
                               target="beta"))
    for split in ("validation", "test"):
        want = data.examples(split, ["beta"])
        assert want and data.target_examples(split) == want
    assert data.target_examples() == data.examples("validation", ["beta"])


def test_answer_column_and_explicit_source(tmp_path):
    path = _write(_rows(4, ("a",)), tmp_path / "d.jsonl")
    spec = {"format": "generic", "path": path, "columns": {"answer": "label", "source": None},
            "source": "mine", "validation": 1, "test": 1}
    data = S.load_sources(spec)
    assert data.sources == ["mine"], "`source` should name every row's source"
    exs = data.examples("train") + data.examples("validation") + data.examples("test")
    assert sorted(e["answer"] for e in exs) == ["0", "0", "1", "2"], "answers come from `label`"
    assert data.answer_format == "full"
    assert data.extract_answer("  7 \n") == "7"


def test_source_defaults_to_file_stem_and_files_combine(tmp_path):
    p1 = _write(_rows(5, ("x",)), tmp_path / "first.jsonl")
    p2 = _write(_rows(5, ("y",)), tmp_path / "second.csv")
    data = S.load_sources({"format": "generic", "path": [p1, p2], "columns": {"source": None},
                           "validation": 1, "test": 1})
    assert data.sources == ["first", "second"], "without a source column the file stem names it"


def test_comma_separated_paths_read_as_a_list(tmp_path):
    """A command line gives several files as one comma-separated string (issue 16, item 5)."""
    p1 = _write(_rows(5, ("x",)), tmp_path / "first.jsonl")
    p2 = _write(_rows(5, ("y",)), tmp_path / "second.csv")
    data = S.load_sources({"format": "generic", "path": f"{p1},{p2}", "columns": {"source": None},
                           "validation": 1, "test": 1})
    assert data.sources == ["first", "second"]
    odd = _write(_rows(5, ("z",)), tmp_path / "a,b.jsonl")  # an existing name is never split
    assert S.load_sources({"format": "generic", "path": odd, "columns": {"source": None},
                           "validation": 1, "test": 1}).sources == ["a,b"]


def test_any_column_role_settable_on_a_shipped_config(tmp_path):
    """issue 16, item 5: data.files from configs holds every column role ("" = the format's
    default), so --config.data.files.columns.source=task works on a locked config."""
    from jaxgrad.config import files_section

    path = _write(_rows(10), tmp_path / "d.jsonl")
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
    p1 = _write(_rows(5, ("x",)), tmp_path / "first.jsonl")
    with pytest.raises(FileNotFoundError) as info:
        S.load_sources({**GENERIC, "path": [p1, str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]})
    msg = str(info.value)
    assert "a.jsonl" in msg and "b.jsonl" in msg and "2 of the 3" in msg, msg


@pytest.mark.parametrize("case", ["empty_jsonl", "blank_jsonl", "empty_csv", "header_only_csv",
                                  "empty_json_array", "not_utf8", "not_utf8_csv", "bad_json_row",
                                  "empty_source"])
def test_data_file_errors_name_the_file_and_row(tmp_path, case):
    """Bad data files are refused naming the file and, where there is one, the row (issue 16,
    item 4): before, an empty JSONL raised a bare StopIteration and non-UTF-8 bytes a
    UnicodeDecodeError that named neither."""
    good = json.dumps({"prompt": "p", "completion": "c", "task": "t"})
    files = {"empty_jsonl": ("d.jsonl", b"", "the file is empty"),
             "blank_jsonl": ("d.jsonl", b"\n  \n", "the file is empty"),
             "empty_csv": ("d.csv", b"", "the file is empty"),
             "header_only_csv": ("d.csv", b"prompt,completion,task\n", "holds no rows"),
             "empty_json_array": ("d.json", b"[]", "holds no rows"),
             "not_utf8": ("d.jsonl", (good + "\n" + '{"prompt": "caf').encode() + b"\xe9"
                          + b'", "completion": "c", "task": "t"}\n', "line 2, column 16"),
             "not_utf8_csv": ("d.csv", b"prompt,completion,task\np,c\xff,t\n", "line 2, column 4"),
             "bad_json_row": ("d.jsonl", (good + "\n" + good + "\n{oops}\n").encode(), "line 3"),
             "empty_source": ("d.jsonl", (good + "\n" + good.replace('"t"', '""') + "\n").encode(),
                              "row 2 of 2 has an empty source")}
    name, data, expected = files[case]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError) as info:
        S.load_sources({**GENERIC, "path": str(path)})
    assert str(path) in str(info.value) and expected in str(info.value), str(info.value)


def test_splits_are_deterministic_disjoint_and_seeded(tmp_path):
    path = _write(_rows(40), tmp_path / "d.jsonl")
    spec = dict(GENERIC, path=path, validation=0.25, test=5)
    a, b = S.load_sources(spec), S.load_sources(spec)
    for split in E.SPLITS:
        assert a.examples(split) == b.examples(split), f"{split} differs between two loads"
    ids = [e["example_id"] for split in E.SPLITS for e in a.examples(split)]
    assert len(ids) == len(set(ids)) == 120, "every example in exactly one split, ids unique"
    assert a.n("validation", "alpha") == 10 and a.n("test", "alpha") == 5
    c = S.load_sources(dict(spec, seed=1))
    assert c.examples("test") != a.examples("test"), "another seed should draw another split"
    # A source's split depends on (seed, its name) only: dropping another source leaves it as is.
    d = S.load_sources(dict(spec, sources=["gamma", "alpha"]))
    assert d.sources == ["gamma", "alpha"], "configured sources keep their configured order"
    assert d.examples("validation", "alpha") == a.examples("validation", "alpha")


def test_example_ids_are_content_hashes(tmp_path):
    rows = _rows(3, ("s",))
    rows.append(dict(rows[0]))  # an exact duplicate gets a suffix
    exs = E.make_examples((r["task"], r["prompt"], r["completion"], None) for r in rows)
    assert exs[0]["example_id"] == E.example_id("s", rows[0]["prompt"], rows[0]["completion"])
    assert exs[3]["example_id"] == exs[0]["example_id"] + "~1", "duplicates must stay distinct"
    reordered = E.make_examples((r["task"], r["prompt"], r["completion"], None)
                                for r in reversed(rows[:3]))
    assert {e["example_id"] for e in reordered} == {e["example_id"] for e in exs[:3]}, \
        "ids must not depend on row order"


def test_alpaca_layout(tmp_path):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "skill": "math"},
            {"instruction": "Say hi.", "input": "", "output": "hi", "skill": "chat"}] * 3
    path = _write(rows, tmp_path / "alpaca.json")
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
    exs = S.read_examples({"format": "flan", "path": _write(rows, tmp_path / "flan.parquet")})
    assert [e["prompt"] for e in exs] == ["Translate: cat\n", "Question: why\n", "Answer this\n"]
    rows[0]["inputs"] = "Translate:"
    exs = S.read_examples({"format": "flan", "path": _write(rows, tmp_path / "flan2.jsonl")})
    assert exs[0]["prompt"] == "Translate:", "inputs ending in ':' get no newline"
    assert [e["source"] for e in exs] == ["wmt", "qa", "qa"]


def test_cot_layout_and_answer_extraction(tmp_path):
    rows = [{"question": f"Is {i} even?", "rationale": f"{i} mod 2 is {i % 2}.",
             "answer": "yes" if i % 2 == 0 else "no"} for i in range(10)]
    data = S.load_sources({"format": "cot", "path": _write(rows, tmp_path / "parity_qa.jsonl"),
                           "validation": 2, "test": 2, "target": "parity_qa"})
    assert data.target == "parity_qa" and data.kinds == {"parity_qa": "target"}
    for e in data.examples("train"):
        assert e["completion"].endswith(f"Therefore, the answer is {e['answer']}.")
        assert data.extract_answer(e["completion"]) == e["answer"], e["completion"]
    assert E.extract_cot_answer("so the answer is 42.\nQ: next question") == "42"
    assert E.extract_cot_answer("no conclusion") is None


def test_missing_column_names_column_file_and_columns(tmp_path):
    path = _write([{"question": "q", "answer": "a"}] * 3, tmp_path / "bad.csv")
    with pytest.raises(ValueError) as err:
        S.read_examples({"format": "cot", "path": path})
    msg = str(err.value)
    assert "'rationale'" in msg and path in msg and "['answer', 'question']" in msg, msg


def test_unknown_names_fail_listing_choices(tmp_path):
    path = _write(_rows(3), tmp_path / "d.jsonl")
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


def test_pickle_needs_allow_pickle(tmp_path):
    path = _write(_rows(5), tmp_path / "seed_data.pkl")
    spec = dict(GENERIC, path=path, validation=1, test=1)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        S.load_sources(spec)
    data = S.load_sources(dict(spec, allow_pickle=True))
    assert sum(data.n(s, "beta") for s in E.SPLITS) == 5


def test_pickle_of_unexpected_object_is_rejected(tmp_path):
    path = tmp_path / "odd.pkl"
    path.write_bytes(pickle.dumps({"not": "a table"}))
    with pytest.raises(TypeError, match="expected a pandas DataFrame"):
        S.read_examples({"path": str(path), "allow_pickle": True})


def test_hub_dataset_offline_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/name' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match="hub dataset 'org/name'.*local file"):
        S.load_sources({"format": "alpaca", "hub": "org/name"})


def test_too_few_examples_for_the_split_fails_naming_the_source(tmp_path):
    path = _write(_rows(3, ("tiny",)), tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match="source 'tiny' has 3 examples: data.files.validation=2 "
                                         "asks for 2 validation examples and data.files.test=1 "
                                         "asks for 1 test example, leaving 0 train examples"):
        S.load_sources(dict(GENERIC, path=path, validation=2, test=1))
    data = S.load_sources(dict(GENERIC, path=path, validation=1.0, test=1.0))
    assert (data.n("train", "tiny"), data.n("validation", "tiny"), data.n("test", "tiny")) == \
        (1, 1, 1), "1.0 is a count of one example (jaxgrad.common.counts), no longer an error"


def test_examples_access_and_save_load(tmp_path):
    data = S.load_sources(dict(GENERIC, path=_write(_rows(10), tmp_path / "d.jsonl"),
                               target="beta"))
    assert [e["source"] for e in data.examples("train", ["gamma", "alpha"])] == \
        ["gamma"] * 6 + ["alpha"] * 6, "sources= selects and orders"
    copy = data.examples("train")
    copy[0]["prompt"] = "edited"
    assert data.examples("train")[0]["prompt"] != "edited", "examples() must return copies"
    with pytest.raises(ValueError, match="split 'dev' is unknown"):
        data.examples("dev")
    with pytest.raises(ValueError, match="unknown sources \\['delta'\\]"):
        data.examples("train", ["delta"])
    data.save(str(tmp_path / "saved"))
    back = M.MultiSourceData.load(str(tmp_path / "saved"))
    assert (back.sources, back.target, back.kinds) == (data.sources, data.target, data.kinds)
    for split in E.SPLITS:
        assert back.examples(split) == data.examples(split), f"{split} changed by save/load"


def test_import_stays_light():
    code = ("import sys, jaxgrad.data, jaxgrad.data.batching; "
            "heavy = [m for m in ('datasets', 'transformers', 'tokenizers', 'ml_collections') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing jaxgrad.data pulled in {out.stdout.strip()}"
