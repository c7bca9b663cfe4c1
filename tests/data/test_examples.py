"""jaxgrad.data.examples: example ids are content hashes, unique when files are combined; the
leading-answer extractor."""

from __future__ import annotations

import pytest

from helpers.data import all_examples, source_rows, write_text
from jaxgrad.data import examples as E, extract_leading_answer, multisource as M, sources as S


@pytest.mark.parametrize("text,expected", [
    ("Yes. Because ...", "Yes"), (" No.", "No"), ("109", "109"), ("3.5 hours.", "3.5 hours"),
    ("plausible\nmore", "plausible"), ("", ""),
])
def test_extract_leading_answer(text, expected):
    assert extract_leading_answer(text) == expected


def test_example_ids_stay_unique_when_files_are_combined(tmp_path):
    p1 = write_text(tmp_path / "one.jsonl", '{"prompt": "p", "completion": "c"}\n' * 2)
    p2 = write_text(tmp_path / "two.jsonl", '{"prompt": "p", "completion": "c"}\n')
    exs = (S.read_examples({"path": p1, "source": "s"})
           + S.read_examples({"path": p2, "source": "s"}))
    assert exs[1]["example_id"] == exs[0]["example_id"] + "~1"
    assert exs[2]["example_id"] == exs[0]["example_id"], "the two reads repeat an id"
    data = M.MultiSourceData.from_examples(exs + E.make_examples([("s", "q", "c", None)] * 3),
                                           validation=1, test=0)
    ids = [e["example_id"] for e in all_examples(data)]
    assert len(ids) == len(set(ids)) == 6
    base = E.example_id("s", "p", "c")
    assert sorted(i for i in ids if i.startswith(base)) == [base, base + "~1", base + "~2"]
    with pytest.raises(ValueError, match="appears twice"):
        M.MultiSourceData({"train": {"s": exs[:1]}, "validation": {"s": exs[2:]}, "test": {}})


def test_example_ids_are_content_hashes(tmp_path):
    rows = source_rows(3, ("s",))
    rows.append(dict(rows[0]))  # an exact duplicate gets a suffix
    exs = E.make_examples((r["task"], r["prompt"], r["completion"], None) for r in rows)
    assert exs[0]["example_id"] == E.example_id("s", rows[0]["prompt"], rows[0]["completion"])
    assert exs[3]["example_id"] == exs[0]["example_id"] + "~1", "duplicates must stay distinct"
    reordered = E.make_examples((r["task"], r["prompt"], r["completion"], None)
                                for r in reversed(rows[:3]))
    assert {e["example_id"] for e in reordered} == {e["example_id"] for e in exs[:3]}, \
        "ids must not depend on row order"
