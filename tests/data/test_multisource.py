"""jaxgrad.data.multisource (MultiSourceData): the target's split, access to the examples, saving
and loading, planted label noise (unique ids, never recombining a held-out target pair), and the
duplicates line logged once per process."""

from __future__ import annotations

import json
import logging

import pytest

from helpers.data import (GENERIC, all_examples, assert_no_leak, duplicated_rows, prompt_pairs,
                          source_rows, write_rows, write_text)
from jaxgrad.data import examples as E, multisource as M, sources as S


def test_label_noise_ids_unique_across_splits_and_save_load(tmp_path):
    mk = lambda rows: E.make_examples(("s", p, c, None) for p, c in rows)  # noqa: E731
    train = mk([("P", "A"), ("Q", "X")])
    val = mk([("P", "C"), ("R", "X")])
    data = M.MultiSourceData({"train": {"s": train}, "validation": {"s": val}, "test": {}},
                             duplicates={"repeated": {"s": 1}})
    noisy = data.with_label_noise(["s"])
    pairs = [prompt_pairs(noisy, split, ["noisy_s"]) for split in ("train", "validation")]
    assert ("P", "X") in pairs[0] and ("P", "X") in pairs[1], "the copies collide by construction"
    ids = [e["example_id"] for e in all_examples(noisy)]
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
    assert prompt_pairs(noisy, "train", ["noisy_o"]) == [("Q", "A")], \
        "(P, C) recombined from o's train is the target's validation pair: dropped"
    assert noisy.duplicates["removed"] == {"noisy_o": 1}
    assert_no_leak(noisy)


def test_the_duplicates_line_is_logged_once_per_process(tmp_path, caplog, monkeypatch):
    """Every pipeline stage loads the data again: one warning, not one per stage."""
    monkeypatch.setattr(M, "_WARNED", set())
    path = write_text(tmp_path / "dups.jsonl",
                      "".join(json.dumps(r) + "\n" for r in duplicated_rows()))
    spec = {"format": "alpaca", "path": path, "target": "greet", "validation": 2, "test": 2}
    with caplog.at_level(logging.WARNING, logger=M.__name__):
        S.load_sources(spec)
        S.load_sources(spec)
    assert sum("duplicates:" in r.getMessage() for r in caplog.records) == 1


def test_target_examples_are_the_targets_split(tmp_path):
    data = S.load_sources(dict(GENERIC, path=write_rows(source_rows(), tmp_path / "data.jsonl"),
                               target="beta"))
    for split in ("validation", "test"):
        want = data.examples(split, ["beta"])
        assert want and data.target_examples(split) == want
    assert data.target_examples() == data.examples("validation", ["beta"])


def test_examples_access_and_save_load(tmp_path):
    data = S.load_sources(dict(GENERIC, path=write_rows(source_rows(10), tmp_path / "d.jsonl"),
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
