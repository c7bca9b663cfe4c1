"""Field reports on jaxgrad/data/sources.py (issue 12): text kept as written (kind 4), split sizes
checked at load time (kind 5), duplicates never straddling splits (kind 8)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from jaxgrad.data import bigbench
from jaxgrad.data import examples as E
from jaxgrad.data import multisource as M
from jaxgrad.data import sources as S


def _write_text(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def _all(data):
    return [e for split in E.SPLITS for e in data.examples(split)]


# ----------------------------------------------------------------------------------------------
# Kind 4: text rewritten by type inference.


def test_case_numeric_text_columns(tmp_path):
    """The field report: zero-padded codes in CSV, JSON-number answers, numeric CSV completions."""
    zips = _write_text(tmp_path / "zip.csv", "prompt,completion,answer,source\n"
                       "Which ZIP is Cambridge MA? ,It is 02139,02139,zips\n"
                       "Which ZIP is Boston MA? ,It is 02116,02116,zips\n"
                       "Which ZIP is Manhattan? ,It is 10001,10001,zips\n"
                       "Which ZIP is nowhere? ,none,,zips\n")
    exs = S.read_examples({"format": "generic", "path": zips, "columns": {"answer": "answer"}})
    assert [e["answer"] for e in exs] == ["02139", "02116", "10001", None], \
        "zero-padded codes must stay as written; a blank answer cell is no answer (None)"
    assert exs[0]["prompt"] == "Which ZIP is Cambridge MA? ", "cells are not stripped"
    gsm = _write_text(tmp_path / "gsm.jsonl", "\n".join([
        '{"question": "3 bags of 6 apples?", "rationale": "3*6=18", "answer": 18}',
        '{"question": "5 halves?", "rationale": "5/2=2.5", "answer": 2.5}',
        '{"question": "7 plus 5?", "rationale": "7+5=12", "answer": 12}']) + "\n")
    exs = S.read_examples({"format": "cot", "path": gsm})
    assert [e["answer"] for e in exs] == ["18", "2.5", "12"], "a JSON int must not become 18.0"
    assert exs[0]["completion"] == "3*6=18 Therefore, the answer is 18."
    prices = _write_text(tmp_path / "prices.csv", "prompt,completion\nPrice of tea?,1.50\n"
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
        path = _write_text(tmp_path / "d.jsonl", "\n".join(rows) + "\n")
    elif layout == "json_array":
        path = _write_text(tmp_path / "d.json", "[\n" + ",\n".join(rows) + "\n]")
    elif layout == "json_lines_in_json":
        path = _write_text(tmp_path / "d.json", "\n".join(rows))
    else:
        col = lambda f: "[" + ", ".join(f(i, lit) for i, (lit, _) in enumerate(literals)) + "]"  # noqa: E731
        path = _write_text(tmp_path / "d.json", "{" + ", ".join([
            f'"prompt": {col(lambda i, _: json.dumps(f"p{i}"))}',
            f'"completion": {col(lambda _, lit: lit)}', f'"answer": {col(lambda _, lit: lit)}',
            f'"source": {col(lambda *_: json.dumps("s"))}']) + "}")
    exs = S.read_examples({"format": "generic", "path": path, "columns": {"answer": "answer"}})
    assert [e["completion"] for e in exs] == [want for _, want in literals], layout
    assert [e["answer"] for e in exs] == [want for _, want in literals], layout


def test_json_mixed_int_float_column_and_nulls(tmp_path):
    """pyarrow casts a column of ints and floats to float (18 -> 18.0): not here."""
    path = _write_text(tmp_path / "mixed.jsonl", "\n".join([
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
    path = _write_text(tmp_path / f"cells{suffix}", "\n".join(lines) + "\n")
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
    bad = _write_text(tmp_path / "bad.csv", "prompt,completion\na,b,c\n")
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
    path = _write_text(tmp_path / "f.jsonl", '{"inputs": 12, "targets": 0.10, "_task_name": "n"}\n')
    (e,) = S.read_examples({"format": "flan", "path": path})
    assert (e["prompt"], e["completion"]) == ("12\n", "0.10")
    path = _write_text(tmp_path / "c.jsonl",
                       '{"question": "q", "rationale": "r", "answer": null}\n'
                       '{"question": "q2", "rationale": "r", "answer": "  "}\n')
    answers = [e["answer"] for e in S.read_examples({"format": "cot", "path": path})]
    assert answers == [None, None], "a null or blank answer is no answer"


def test_bigbench_targets_keep_their_literal(tmp_path):
    task = tmp_path / "numbers"
    task.mkdir()
    _write_text(task / "task.json", '{"name": "numbers", "keywords": ["mathematics"], "examples": ['
                '{"input": "half of 5?", "target": 2.50},'
                '{"input": 7, "target": [18, "eighteen"]},'
                '{"input": "pick", "target_scores": {"small": 0.5, "big": 1.0}}]}')
    rows, _ = bigbench.read_tasks(str(task))
    assert [(p.split("Q: ")[1].split("\n")[0], c) for _, p, c, _ in rows] == \
        [("half of 5?", "2.50"), ("7", "18"), ("pick", "big")], \
        "JSON numbers keep their literal; numeric target_scores still pick the best choice"


# ----------------------------------------------------------------------------------------------
# Kind 5: splits that come out empty.


def _skills(tmp_path, sizes, name="d.jsonl"):
    rows = [{"prompt": f"{skill} {i}", "completion": f"{skill} out {i}", "skill": skill}
            for skill, n in sizes.items() for i in range(n)]
    return _write_text(tmp_path / name, "".join(json.dumps(r) + "\n" for r in rows))


def _spec(path, **kw):
    return dict({"format": "generic", "path": path, "columns": {"source": "skill"}}, **kw)


def test_case_target_one_example_is_refused_at_load(tmp_path):
    path = _skills(tmp_path, {"add": 20, "copy": 20, "rare": 1})
    with pytest.raises(ValueError) as err:
        S.load_sources(_spec(path, target="rare", validation=0.1, test=0.1))
    msg = str(err.value)
    for part in ("target source 'rare' has 1 example", "data.files.validation=0.1",
                 "0 validation examples", "set data.files.validation to a count >= 1",
                 "at least 3 examples"):
        assert part in msg, f"{part!r} missing from: {msg}"
    assert "'add'" not in msg and "'copy'" not in msg, "only the source at fault is named"


def test_target_without_test_examples_when_test_is_asked_for(tmp_path):
    path = _skills(tmp_path, {"a": 10, "t": 4})
    with pytest.raises(ValueError) as err:
        S.load_sources(_spec(path, target="t", validation=1, test=0.1))
    msg = str(err.value)
    assert all(p in msg for p in ("target source 't' has 4 examples", "data.files.test=0.1",
                                  "0 test examples", "set data.files.test to a count >= 1")), msg
    data = S.load_sources(_spec(path, target="t", validation=1, test=0))
    assert (data.n("validation", "t"), data.n("test", "t"), data.n("train", "t")) == (1, 0, 3), \
        "test=0 asks for no test split: allowed"
    data = S.load_sources(_spec(path, target="t", validation=1, test=0.2))
    assert data.n("test", "t") == 1 and data.n("test", "a") == 2


def test_training_source_without_train_examples_and_counts_too_large(tmp_path):
    path = _skills(tmp_path, {"big": 10, "small": 3, "t": 10})
    with pytest.raises(ValueError) as err:
        S.load_sources(_spec(path, target="t", validation=2, test=1))
    msg = str(err.value)
    assert "source 'small' has 3 examples" in msg and "leaving 0 train examples" in msg, msg
    assert "data.files.validation=2 asks for 2 validation examples" in msg, msg
    assert "data.files.test=1 asks for 1 test example" in msg, msg
    assert "'big'" not in msg and "target source" not in msg, msg
    with pytest.raises(ValueError) as err:
        S.load_sources(_spec(path, target="t", validation=5, test=1))
    msg = str(err.value)
    assert "source 'small' has 3 examples: data.files.validation=5 asks for 5 validation" in msg
    assert "source 'big'" not in msg and "target source 't'" not in msg, \
        "big and t have room for 5 + 1 and a train example"
    with pytest.raises(ValueError) as err:
        S.load_sources(_spec(path, target="t", validation=9, test=1))
    msg = str(err.value)
    assert msg.count("\n  ") == 3 and "target source 't' has 10 examples" in msg, \
        f"every source at fault is listed, one per line: {msg}"


def test_split_sizes_follow_the_counts_rule(tmp_path):
    path = _skills(tmp_path, {"a": 10, "t": 10})
    by_float = S.load_sources(_spec(path, target="t", validation=2.0, test=1.0))
    by_int = S.load_sources(_spec(path, target="t", validation=2, test=1))
    assert (by_float.n("validation", "t"), by_float.n("test", "t")) == (2, 1), \
        "2.0 is two examples and 1.0 one (ml_collections writes counts as floats)"
    for split in E.SPLITS:
        assert by_float.examples(split) == by_int.examples(split)
    import ml_collections

    files = ml_collections.ConfigDict(_spec(path, target="t", validation=0.1, test=0.1))
    files.validation = 3  # stored as 3.0
    assert S.load_sources(files).n("validation", "a") == 3
    with pytest.raises(ValueError, match=r"data.files.validation must be .* got 2.5"):
        S.load_sources(_spec(path, target="t", validation=2.5))
    with pytest.raises(ValueError, match=r"data.files.test must be"):
        S.load_sources(_spec(path, target="t", test=-1))
    with pytest.raises(TypeError, match=r"data.files.validation must be"):
        S.load_sources(_spec(path, target="t", validation=None))


def test_max_examples_is_named_when_it_starves_a_source(tmp_path):
    path = _skills(tmp_path, {"a": 10, "t": 10})
    with pytest.raises(ValueError) as err:
        S.load_sources(_spec(path, target="t", validation=2, test=1, max_examples=3))
    msg = str(err.value)
    assert "data.files.max_examples=3" in msg and "source 'a' has 3 examples" in msg, msg


def test_from_examples_names_the_plain_settings():
    exs = E.make_examples(("t", f"p{i}", "c", None) for i in range(2))
    with pytest.raises(ValueError, match=r"target source 't' has 2 examples: validation=0.1 gives "
                                         r"0 validation examples.*set validation to a count"):
        M.MultiSourceData.from_examples(exs, target="t", validation=0.1, test=0)


# ----------------------------------------------------------------------------------------------
# Kind 8: leakage between splits.


def _dups_rows():
    hi = {"id": "q1", "instruction": "Say hi", "input": "", "output": "hi", "skill": "greet"}
    return ([hi] * 3 + [dict(hi, input=None)]
            + [{"id": f"g{i}", "instruction": f"Greet person {i}", "input": " ",
                "output": f"hello {i}", "skill": "greet"} for i in range(6)]
            + [{"id": f"m{i}", "instruction": f"Add {i} and {i}", "input": "", "output": str(2 * i),
                "skill": "math"} for i in range(8)])


def _pairs(data, split, sources=None):
    return [(e["prompt"], e["completion"]) for e in data.examples(split, sources)]


def _assert_no_leak(data):
    ids = [e["example_id"] for e in _all(data)]
    assert len(ids) == len(set(ids)), "example ids must be unique"
    for name in data.sources:
        seen = {}
        for split in E.SPLITS:
            for pair in _pairs(data, split, [name]):
                assert seen.setdefault(pair, split) == split, \
                    f"{name}: a pair sits in {seen[pair]} and {split}"
    if data.target:
        held = set(_pairs(data, "validation", [data.target]) + _pairs(data, "test", [data.target]))
        for name in data.sources:
            if name != data.target:
                assert not held & set(p for s in E.SPLITS for p in _pairs(data, s, [name])), \
                    f"{name} holds a pair of the target's validation/test split"
        assert not held & set(_pairs(data, "train")), "a held-out target pair is trained on"


@pytest.mark.parametrize("seed", range(8))
def test_case_duplicate_rows_across_splits(tmp_path, seed, caplog, monkeypatch):
    monkeypatch.setattr(M, "_WARNED", set())  # logged once per process: forget earlier tests
    path = _write_text(tmp_path / "dups.jsonl", "".join(json.dumps(r) + "\n" for r in _dups_rows()))
    with caplog.at_level(logging.WARNING, logger=M.__name__):
        data = S.load_sources({"format": "alpaca", "path": path, "target": "greet",
                               "validation": 2, "test": 2, "seed": seed})
    _assert_no_leak(data)
    copies = [e for e in _all(data) if e["completion"] == "hi"]
    assert len(copies) == 4 and len({e["prompt"] for e in copies}) == 1, \
        "input '' / None / ' ' build one prompt: four copies of one example"
    assert data.duplicates == {"repeated": {"greet": 3}, "removed": {}}
    assert "duplicates: 3 rows" in data.summary() and "greet=3" in data.summary()
    assert any("duplicates: 3 rows" in r.getMessage() for r in caplog.records), "logged"
    distinct = {split: len(set(_pairs(data, split, ["greet"]))) for split in E.SPLITS}
    assert distinct == {"train": 3, "validation": 2, "test": 2}, \
        "split sizes count distinct pairs (7 in greet)"


@pytest.mark.parametrize("seed", range(6))
def test_target_pairs_held_out_are_removed_from_other_sources(tmp_path, seed):
    rows = ([{"prompt": f"shared {i}", "completion": f"s{i}", "skill": "t"} for i in range(6)]
            + [{"prompt": f"own {i}", "completion": f"o{i}", "skill": "t"} for i in range(6)]
            + [{"prompt": f"shared {i}", "completion": f"s{i}", "skill": "o"} for i in range(6)] * 2
            + [{"prompt": f"other {i}", "completion": f"x{i}", "skill": "o"} for i in range(8)])
    path = _write_text(tmp_path / "d.csv", pd.DataFrame(rows).to_csv(index=False))
    data = S.load_sources(_spec(path, target="t", validation=3, test=2, seed=seed))
    _assert_no_leak(data)
    held = set(_pairs(data, "validation", ["t"]) + _pairs(data, "test", ["t"]))
    shared_held = sum(p[0].startswith("shared") for p in held)
    assert data.duplicates["removed"].get("o", 0) == 2 * shared_held, \
        "both copies of each held-out shared pair are removed from o"
    assert data.duplicates["repeated"] == {"o": 6}
    kept = {p for s in E.SPLITS for p in _pairs(data, s, ["o"]) if p[0].startswith("shared")}
    assert kept == {(f"shared {i}", f"s{i}") for i in range(6)} - held, \
        "shared pairs the target trains on stay in o"


def test_cross_source_removal_happens_in_at_least_one_seed(tmp_path):
    """The removal branch is reached (the parametrized test could pass with nothing held)."""
    rows = ([{"prompt": f"p{i}", "completion": "c", "skill": "t"} for i in range(5)]
            + [{"prompt": f"p{i}", "completion": "c", "skill": "o"} for i in range(5)]
            + [{"prompt": f"q{i}", "completion": "c", "skill": "o"} for i in range(5)])
    path = _write_text(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    data = S.load_sources(_spec(path, target="t", validation=1, test=1))
    assert data.duplicates["removed"] == {"o": 2} and data.n("train", "o") + \
        data.n("validation", "o") + data.n("test", "o") == 8
    assert "2 rows removed from other sources" in data.summary()


def test_a_source_emptied_by_the_target_is_refused(tmp_path):
    rows = ([{"prompt": f"p{i}", "completion": "c", "skill": "t"} for i in range(4)]
            + [{"prompt": "p0", "completion": "c", "skill": "o"}] * 2)
    path = _write_text(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    for seed in range(20):
        held = S.load_sources(_spec(path, target="t", validation=1, test=1, seed=seed,
                                    sources=["t"]))
        held = set(_pairs(held, "validation") + _pairs(held, "test"))
        if ("p0", "c") in held:
            break
    else:
        raise AssertionError("no seed holds out p0")
    with pytest.raises(ValueError) as err:
        S.load_sources(_spec(path, target="t", validation=1, test=1, seed=seed))
    msg = str(err.value)
    assert "source 'o' has 0 examples (2 rows; splits count distinct (prompt, completion) pairs; " \
        "after removing 2 rows whose pair is in the target's validation/test split)" in msg, msg
    assert "leaving 0 train examples" in msg and "target source" not in msg, msg


def test_splits_without_duplicates_are_unchanged():
    """Pinned: the split each example had before duplicates were grouped (same seed, same rule)."""
    exs = E.make_examples((name, f"{name} p{i}", f"c{i}", None)
                          for name in ("a", "b") for i in range(23))
    for seed in range(4):
        data = M.MultiSourceData.from_examples(exs, validation=0.2, test=3, seed=seed, target="a")
        for name in ("a", "b"):
            order = np.random.default_rng(E.seed_for(seed, name)).permutation(23)
            n_val = int(round(0.2 * 23))
            want = {"validation": order[:n_val], "test": order[n_val:n_val + 3],
                    "train": order[n_val + 3:]}
            for split, idx in want.items():
                assert [e["prompt"] for e in data.examples(split, [name])] == \
                    [f"{name} p{i}" for i in sorted(idx)], (seed, name, split)
        assert data.duplicates == {"repeated": {}, "removed": {}} and "duplicates" not in \
            data.summary()


def test_example_ids_stay_unique_when_files_are_combined(tmp_path):
    p1 = _write_text(tmp_path / "one.jsonl", '{"prompt": "p", "completion": "c"}\n' * 2)
    p2 = _write_text(tmp_path / "two.jsonl", '{"prompt": "p", "completion": "c"}\n')
    exs = (S.read_examples({"path": p1, "source": "s"})
           + S.read_examples({"path": p2, "source": "s"}))
    assert exs[1]["example_id"] == exs[0]["example_id"] + "~1"
    assert exs[2]["example_id"] == exs[0]["example_id"], "the two reads repeat an id"
    data = M.MultiSourceData.from_examples(exs + E.make_examples([("s", "q", "c", None)] * 3),
                                           validation=1, test=0)
    ids = [e["example_id"] for e in _all(data)]
    assert len(ids) == len(set(ids)) == 6
    base = E.example_id("s", "p", "c")
    assert sorted(i for i in ids if i.startswith(base)) == [base, base + "~1", base + "~2"]
    with pytest.raises(ValueError, match="appears twice"):
        M.MultiSourceData({"train": {"s": exs[:1]}, "validation": {"s": exs[2:]}, "test": {}})


def test_label_noise_ids_unique_across_splits_and_save_load(tmp_path):
    mk = lambda rows: E.make_examples(("s", p, c, None) for p, c in rows)  # noqa: E731
    train = mk([("P", "A"), ("Q", "X")])
    val = mk([("P", "C"), ("R", "X")])
    data = M.MultiSourceData({"train": {"s": train}, "validation": {"s": val}, "test": {}},
                             duplicates={"repeated": {"s": 1}})
    noisy = data.with_label_noise(["s"])
    pairs = [_pairs(noisy, split, ["noisy_s"]) for split in ("train", "validation")]
    assert ("P", "X") in pairs[0] and ("P", "X") in pairs[1], "the copies collide by construction"
    ids = [e["example_id"] for e in _all(noisy)]
    assert len(ids) == len(set(ids)), "noisy copies keep ids unique across splits"
    noisy.save(str(tmp_path / "saved"))
    back = M.MultiSourceData.load(str(tmp_path / "saved"))
    assert back.duplicates == {"repeated": {"s": 1}, "removed": {}}


def test_label_noise_never_recombines_a_held_out_target_pair():
    mk = lambda src, rows: E.make_examples((src, p, c, None) for p, c in rows)  # noqa: E731
    data = M.MultiSourceData({
        "train": {"t": mk("t", [("T1", "a"), ("T2", "b")]), "o": mk("o", [("P", "A"), ("Q", "C")])},
        "validation": {"t": mk("t", [("P", "C")]), "o": []}, "test": {"t": [], "o": []}},
        target="t")
    noisy = data.with_label_noise(["o"])
    assert _pairs(noisy, "train", ["noisy_o"]) == [("Q", "A")], \
        "(P, C) recombined from o's train is the target's validation pair: dropped"
    assert noisy.duplicates["removed"] == {"noisy_o": 1}
    _assert_no_leak(noisy)


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


def test_the_duplicates_line_is_logged_once_per_process(tmp_path, caplog, monkeypatch):
    """Every pipeline stage loads the data again: one warning, not one per stage."""
    monkeypatch.setattr(M, "_WARNED", set())
    path = _write_text(tmp_path / "dups.jsonl", "".join(json.dumps(r) + "\n" for r in _dups_rows()))
    spec = {"format": "alpaca", "path": path, "target": "greet", "validation": 2, "test": 2}
    with caplog.at_level(logging.WARNING, logger=M.__name__):
        S.load_sources(spec)
        S.load_sources(spec)
    assert sum("duplicates:" in r.getMessage() for r in caplog.records) == 1
