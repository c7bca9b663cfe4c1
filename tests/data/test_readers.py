"""jaxgrad.data.readers: every file type and layout read as the text it holds (issue 12, kind 4:
never what a type inference makes of it; typed columns as str of the value), blank answers,
quoting, errors naming the file and the row, pickle only when allowed, the Hub offline, and
importing jaxgrad.data without the heavy dependencies."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pandas as pd
import pytest

from helpers.data import GENERIC, source_rows, write_rows, write_text
from jaxgrad.data import examples as E, sources as S


# ----------------------------------------------------------------------------------------------
# Field reports, kind 4: text rewritten by type inference.


def test_case_numeric_text_columns(tmp_path):
    """The field report: zero-padded codes in CSV, JSON-number answers, numeric CSV completions."""
    zips = write_text(tmp_path / "zip.csv", "prompt,completion,answer,source\n"
                       "Which ZIP is Cambridge MA? ,It is 02139,02139,zips\n"
                       "Which ZIP is Boston MA? ,It is 02116,02116,zips\n"
                       "Which ZIP is Manhattan? ,It is 10001,10001,zips\n"
                       "Which ZIP is nowhere? ,none,,zips\n")
    exs = S.read_examples({"format": "generic", "path": zips, "columns": {"answer": "answer"}})
    assert [e["answer"] for e in exs] == ["02139", "02116", "10001", None], \
        "zero-padded codes must stay as written; a blank answer cell is no answer (None)"
    assert exs[0]["prompt"] == "Which ZIP is Cambridge MA? ", "cells are not stripped"
    gsm = write_text(tmp_path / "gsm.jsonl", "\n".join([
        '{"question": "3 bags of 6 apples?", "rationale": "3*6=18", "answer": 18}',
        '{"question": "5 halves?", "rationale": "5/2=2.5", "answer": 2.5}',
        '{"question": "7 plus 5?", "rationale": "7+5=12", "answer": 12}']) + "\n")
    exs = S.read_examples({"format": "cot", "path": gsm})
    assert [e["answer"] for e in exs] == ["18", "2.5", "12"], "a JSON int must not become 18.0"
    assert exs[0]["completion"] == "3*6=18 Therefore, the answer is 18."
    prices = write_text(tmp_path / "prices.csv", "prompt,completion\nPrice of tea?,1.50\n"
                         "Price of jam?,3.00\nPrice of bread?,2\n")
    exs = S.read_examples({"format": "generic", "path": prices, "source": "prices"})
    assert [e["completion"] for e in exs] == ["1.50", "3.00", "2"]


# Literals a type inference would rewrite, as (JSON literal, expected text).
JSON_LITERALS = [("18", "18"), ("2.50", "2.50"), ("1e3", "1e3"), ("-0.0", "-0.0"),
                 ("007.5", None), ("true", "true"), ("false", "false"), ('"02139"', "02139"),
                 ("12345678901234567890123", "12345678901234567890123"), ('"NaN"', "NaN"),
                 ('[1, 2.50, "x"]', '[1, 2.50, "x"]'), ('{"a": 1.0}', '{"a": 1.0}')]


@pytest.mark.parametrize("layout", ["jsonl", "json_array", "json_columns", "json_lines_in_json"])
def test_json_numbers_keep_their_literal_in_every_json_layout(tmp_path, layout):
    literals = [(lit, want) for lit, want in JSON_LITERALS if want is not None]
    rows = [f'{{"prompt": "p{i}", "completion": {lit}, "answer": {lit}, "source": "s"}}'
            for i, (lit, _) in enumerate(literals)]
    if layout == "jsonl":
        path = write_text(tmp_path / "d.jsonl", "\n".join(rows) + "\n")
    elif layout == "json_array":
        path = write_text(tmp_path / "d.json", "[\n" + ",\n".join(rows) + "\n]")
    elif layout == "json_lines_in_json":
        path = write_text(tmp_path / "d.json", "\n".join(rows))
    else:
        col = lambda f: "[" + ", ".join(f(i, lit) for i, (lit, _) in enumerate(literals)) + "]"  # noqa: E731
        path = write_text(tmp_path / "d.json", "{" + ", ".join([
            f'"prompt": {col(lambda i, _: json.dumps(f"p{i}"))}',
            f'"completion": {col(lambda _, lit: lit)}', f'"answer": {col(lambda _, lit: lit)}',
            f'"source": {col(lambda *_: json.dumps("s"))}']) + "}")
    exs = S.read_examples({"format": "generic", "path": path, "columns": {"answer": "answer"}})
    assert [e["completion"] for e in exs] == [want for _, want in literals], layout
    assert [e["answer"] for e in exs] == [want for _, want in literals], layout


def test_json_mixed_int_float_column_and_nulls(tmp_path):
    """pyarrow casts a column of ints and floats to float (18 -> 18.0): not here."""
    path = write_text(tmp_path / "mixed.jsonl", "\n".join([
        '{"instruction": "a", "input": 3, "output": 18, "skill": "m"}',
        '{"instruction": "b", "input": null, "output": 2.5, "skill": "m"}',
        '{"instruction": "c", "output": 100, "skill": "m"}',
        '{"instruction": "d", "input": "", "output": null, "skill": "m"}']))
    exs = S.read_examples({"format": "alpaca", "path": path})
    assert [e["completion"] for e in exs] == ["18", "2.5", "100", ""], \
        "JSON numbers keep their literal; null text is the empty string"
    assert "### Input:\n3\n\n" in exs[0]["prompt"], "a numeric input keeps its literal"
    assert "### Input:" not in exs[1]["prompt"] and "### Input:" not in exs[2]["prompt"], \
        "null and missing inputs are blank inputs"


@pytest.mark.parametrize("suffix,sep", [(".csv", ","), (".tsv", "\t")])
def test_delimited_cells_are_strings_as_written(tmp_path, suffix, sep):
    cells = ["02139", "1.50", "NA", "nan", "None", "True", "1e3", " 7 ", "-0", "", "null", "#N/A"]
    lines = [sep.join(["prompt", "completion", "label", "task"])]
    lines += [sep.join([f"q{i}", c, c, "t"]) for i, c in enumerate(cells)]
    path = write_text(tmp_path / f"cells{suffix}", "\n".join(lines) + "\n")
    exs = S.read_examples({"format": "generic", "path": path,
                           "columns": {"answer": "label", "source": "task"}})
    assert [e["completion"] for e in exs] == cells, "every cell is the string written"
    assert [e["answer"] for e in exs] == [c if c.strip() else None for c in cells], \
        "answers too; only a blank cell is no answer"


def test_csv_quoting_bom_blank_lines_and_short_rows(tmp_path):
    path = tmp_path / "q.csv"
    path.write_bytes('\ufeffprompt,completion\n"a, b","line1\nline2"\n\nx,007\ny\n'.encode("utf-8"))
    exs = S.read_examples({"format": "generic", "path": str(path), "source": "q"})
    assert [(e["prompt"], e["completion"]) for e in exs] == \
        [("a, b", "line1\nline2"), ("x", "007"), ("y", "")], \
        "quoted commas/newlines kept, BOM dropped, blank line skipped, short row blank"
    bad = write_text(tmp_path / "bad.csv", "prompt,completion\na,b,c\n")
    with pytest.raises(ValueError, match="bad.csv: line 2 has 3 cells"):
        S.read_examples({"format": "generic", "path": bad, "source": "q"})


def test_parquet_and_pickle_typed_columns_are_str_of_the_value(tmp_path):
    df = pd.DataFrame({"prompt": ["a", "b", "c"], "completion": [18, 2, 100],
                       "answer": [2.5, float("nan"), 18.0], "code": ["02139", "1.50", None],
                       "source": ["s", "s", "s"]})
    for name, write in (("d.parquet", df.to_parquet), ("d.pkl", df.to_pickle)):
        path = str(tmp_path / name)
        write(path)
        exs = S.read_examples({"format": "generic", "path": path, "allow_pickle": True,
                               "columns": {"answer": "answer"}})
        assert [e["completion"] for e in exs] == ["18", "2", "100"], f"{name}: int64 -> str(int)"
        assert [e["answer"] for e in exs] == ["2.5", None, "18.0"], \
            f"{name}: a float column is str(float); NaN is blank"
        exs = S.read_examples({"format": "generic", "path": path, "allow_pickle": True,
                               "columns": {"completion": "code"}})
        assert [e["completion"] for e in exs] == ["02139", "1.50", ""], f"{name}: strings as is"


def test_hub_dataset_typed_columns(monkeypatch):
    import datasets

    ds = datasets.Dataset.from_dict({"question": ["q1", "q2"], "rationale": ["r", "r"],
                                     "answer": [18, 7]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: ds)
    exs = S.read_examples({"format": "cot", "hub": "org/gsm"})
    assert [e["answer"] for e in exs] == ["18", "7"]
    assert exs[0]["completion"] == "r Therefore, the answer is 18."


def test_flan_targets_and_cot_blank_answer(tmp_path):
    path = write_text(tmp_path / "f.jsonl", '{"inputs": 12, "targets": 0.10, "_task_name": "n"}\n')
    (e,) = S.read_examples({"format": "flan", "path": path})
    assert (e["prompt"], e["completion"]) == ("12\n", "0.10")
    path = write_text(tmp_path / "c.jsonl",
                       '{"question": "q", "rationale": "r", "answer": null}\n'
                       '{"question": "q2", "rationale": "r", "answer": "  "}\n')
    answers = [e["answer"] for e in S.read_examples({"format": "cot", "path": path})]
    assert answers == [None, None], "a null or blank answer is no answer"


@pytest.mark.parametrize("name,text,line", [
    ("open.csv", 'prompt,completion\n"unclosed,1\nsecond,2\nthird,3\n', 4),
    ("after.tsv", 'prompt\tcompletion\n"Hi," she said\tok\nsecond\t2\n', 2)])
def test_malformed_quotes_are_refused_not_swallowed(tmp_path, name, text, line):
    """An unclosed quote would otherwise eat every later row into one cell, silently."""
    from jaxgrad.data import read_examples

    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"{name}: not a valid (CSV|TSV) file at line {line}"):
        read_examples({"format": "generic", "path": str(path), "source": "s"})


def test_rfc4180_quoting_is_read(tmp_path):
    from jaxgrad.data import read_examples

    path = tmp_path / "q.csv"
    path.write_text('prompt,completion\n"He said ""hi""",ok\n"a,b","0.50"\n')
    got = [(e["prompt"], e["completion"]) for e in
           read_examples({"format": "generic", "path": str(path), "source": "s"})]
    assert got == [('He said "hi"', "ok"), ("a,b", "0.50")]


# ----------------------------------------------------------------------------------------------
# File types and errors.


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".tsv", ".parquet"])
def test_generic_loader_reads_every_file_type(tmp_path, suffix):
    rows = source_rows()
    path = write_rows(rows, tmp_path / f"data{suffix}")
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


def test_missing_column_names_column_file_and_columns(tmp_path):
    path = write_rows([{"question": "q", "answer": "a"}] * 3, tmp_path / "bad.csv")
    with pytest.raises(ValueError) as err:
        S.read_examples({"format": "cot", "path": path})
    msg = str(err.value)
    assert "'rationale'" in msg and path in msg and "['answer', 'question']" in msg, msg


def test_pickle_needs_allow_pickle(tmp_path):
    path = write_rows(source_rows(5), tmp_path / "seed_data.pkl")
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


def test_import_stays_light():
    code = ("import sys, jaxgrad.data, jaxgrad.data.batching; "
            "heavy = [m for m in ('datasets', 'transformers', 'tokenizers', 'ml_collections') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing jaxgrad.data pulled in {out.stdout.strip()}"
