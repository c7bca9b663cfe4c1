"""Helpers shared by the data tests (tests/data/): small data files of every type written on the
fly, and the checks that no (prompt, completion) pair leaks between splits or out of the target's
held-out splits."""

from __future__ import annotations

import json
import os

import pandas as pd

from jaxgrad.data import examples as E

# ---- rows of three sources in a "task" column, written as any file type ------------------------

GENERIC = {"format": "generic", "columns": {"source": "task"}, "validation": 2, "test": 0.2}


def source_rows(n_per_source=10, names=("alpha", "beta", "gamma")):
    return [{"prompt": f"{name} prompt {i}", "completion": f"{name} completion {i}",
             "task": name, "label": str(i % 3)}
            for name in names for i in range(n_per_source)]


def write_rows(rows, path):
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


def write_text(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---- leakage between splits (field reports, kind 8) --------------------------------------------

def all_examples(data):
    return [e for split in E.SPLITS for e in data.examples(split)]


def duplicated_rows():
    hi = {"id": "q1", "instruction": "Say hi", "input": "", "output": "hi", "skill": "greet"}
    return ([hi] * 3 + [dict(hi, input=None)]
            + [{"id": f"g{i}", "instruction": f"Greet person {i}", "input": " ",
                "output": f"hello {i}", "skill": "greet"} for i in range(6)]
            + [{"id": f"m{i}", "instruction": f"Add {i} and {i}", "input": "", "output": str(2 * i),
                "skill": "math"} for i in range(8)])


def prompt_pairs(data, split, sources=None):
    return [(e["prompt"], e["completion"]) for e in data.examples(split, sources)]


def assert_no_leak(data):
    ids = [e["example_id"] for e in all_examples(data)]
    assert len(ids) == len(set(ids)), "example ids must be unique"
    for name in data.sources:
        seen = {}
        for split in E.SPLITS:
            for pair in prompt_pairs(data, split, [name]):
                assert seen.setdefault(pair, split) == split, \
                    f"{name}: a pair sits in {seen[pair]} and {split}"
    if data.target:
        held = set(prompt_pairs(data, "validation", [data.target])
                   + prompt_pairs(data, "test", [data.target]))
        for name in data.sources:
            if name != data.target:
                assert not held & set(p for s in E.SPLITS for p in prompt_pairs(data, s, [name])), \
                    f"{name} holds a pair of the target's validation/test split"
        assert not held & set(prompt_pairs(data, "train")), "a held-out target pair is trained on"
