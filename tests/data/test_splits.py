"""jaxgrad.data.splits (through load_sources and MultiSourceData.from_examples): split sizes
checked at load time and named when they cannot be met (issue 12, kind 5), the counts rule,
duplicates never straddling splits nor a held-out target pair trained on in another source
(kind 8), and deterministic, disjoint, seeded splits."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from helpers.data import (GENERIC, all_examples, assert_no_leak, duplicated_rows, prompt_pairs,
                          source_rows, write_rows, write_text)
from jaxgrad.data import examples as E, multisource as M, sources as S


# ----------------------------------------------------------------------------------------------
# Field reports, kind 5: splits that come out empty.


def _skills(tmp_path, sizes, name="d.jsonl"):
    rows = [{"prompt": f"{skill} {i}", "completion": f"{skill} out {i}", "skill": skill}
            for skill, n in sizes.items() for i in range(n)]
    return write_text(tmp_path / name, "".join(json.dumps(r) + "\n" for r in rows))


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
# Field reports, kind 8: leakage between splits.


@pytest.mark.parametrize("seed", range(8))
def test_case_duplicate_rows_across_splits(tmp_path, seed, caplog, monkeypatch):
    monkeypatch.setattr(M, "_WARNED", set())  # logged once per process: forget earlier tests
    path = write_text(tmp_path / "dups.jsonl",
                      "".join(json.dumps(r) + "\n" for r in duplicated_rows()))
    with caplog.at_level(logging.WARNING, logger=M.__name__):
        data = S.load_sources({"format": "alpaca", "path": path, "target": "greet",
                               "validation": 2, "test": 2, "seed": seed})
    assert_no_leak(data)
    copies = [e for e in all_examples(data) if e["completion"] == "hi"]
    assert len(copies) == 4 and len({e["prompt"] for e in copies}) == 1, \
        "input '' / None / ' ' build one prompt: four copies of one example"
    assert data.duplicates == {"repeated": {"greet": 3}, "removed": {}}
    assert "duplicates: 3 rows" in data.summary() and "greet=3" in data.summary()
    assert any("duplicates: 3 rows" in r.getMessage() for r in caplog.records), "logged"
    distinct = {split: len(set(prompt_pairs(data, split, ["greet"]))) for split in E.SPLITS}
    assert distinct == {"train": 3, "validation": 2, "test": 2}, \
        "split sizes count distinct pairs (7 in greet)"


@pytest.mark.parametrize("seed", range(6))
def test_target_pairs_held_out_are_removed_from_other_sources(tmp_path, seed):
    rows = ([{"prompt": f"shared {i}", "completion": f"s{i}", "skill": "t"} for i in range(6)]
            + [{"prompt": f"own {i}", "completion": f"o{i}", "skill": "t"} for i in range(6)]
            + [{"prompt": f"shared {i}", "completion": f"s{i}", "skill": "o"} for i in range(6)] * 2
            + [{"prompt": f"other {i}", "completion": f"x{i}", "skill": "o"} for i in range(8)])
    path = write_text(tmp_path / "d.csv", pd.DataFrame(rows).to_csv(index=False))
    data = S.load_sources(_spec(path, target="t", validation=3, test=2, seed=seed))
    assert_no_leak(data)
    held = set(prompt_pairs(data, "validation", ["t"]) + prompt_pairs(data, "test", ["t"]))
    shared_held = sum(p[0].startswith("shared") for p in held)
    assert data.duplicates["removed"].get("o", 0) == 2 * shared_held, \
        "both copies of each held-out shared pair are removed from o"
    assert data.duplicates["repeated"] == {"o": 6}
    kept = {p for s in E.SPLITS for p in prompt_pairs(data, s, ["o"]) if p[0].startswith("shared")}
    assert kept == {(f"shared {i}", f"s{i}") for i in range(6)} - held, \
        "shared pairs the target trains on stay in o"


def test_cross_source_removal_happens_in_at_least_one_seed(tmp_path):
    """The removal branch is reached (the parametrized test could pass with nothing held)."""
    rows = ([{"prompt": f"p{i}", "completion": "c", "skill": "t"} for i in range(5)]
            + [{"prompt": f"p{i}", "completion": "c", "skill": "o"} for i in range(5)]
            + [{"prompt": f"q{i}", "completion": "c", "skill": "o"} for i in range(5)])
    path = write_text(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    data = S.load_sources(_spec(path, target="t", validation=1, test=1))
    assert data.duplicates["removed"] == {"o": 2} and data.n("train", "o") + \
        data.n("validation", "o") + data.n("test", "o") == 8
    assert "2 rows removed from other sources" in data.summary()


def test_a_source_emptied_by_the_target_is_refused(tmp_path):
    rows = ([{"prompt": f"p{i}", "completion": "c", "skill": "t"} for i in range(4)]
            + [{"prompt": "p0", "completion": "c", "skill": "o"}] * 2)
    path = write_text(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    for seed in range(20):
        held = S.load_sources(_spec(path, target="t", validation=1, test=1, seed=seed,
                                    sources=["t"]))
        held = set(prompt_pairs(held, "validation") + prompt_pairs(held, "test"))
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


# ----------------------------------------------------------------------------------------------
# Splits.


def test_splits_are_deterministic_disjoint_and_seeded(tmp_path):
    path = write_rows(source_rows(40), tmp_path / "d.jsonl")
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


def test_too_few_examples_for_the_split_fails_naming_the_source(tmp_path):
    path = write_rows(source_rows(3, ("tiny",)), tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match="source 'tiny' has 3 examples: data.files.validation=2 "
                                         "asks for 2 validation examples and data.files.test=1 "
                                         "asks for 1 test example, leaving 0 train examples"):
        S.load_sources(dict(GENERIC, path=path, validation=2, test=1))
    data = S.load_sources(dict(GENERIC, path=path, validation=1.0, test=1.0))
    assert (data.n("train", "tiny"), data.n("validation", "tiny"), data.n("test", "tiny")) == \
        (1, 1, 1), "1.0 is a count of one example (jaxgrad.common.counts), no longer an error"
