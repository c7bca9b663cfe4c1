"""Tests of jaxgrad/data/synthetic.py: determinism, arithmetic and string answers, noise, sizes."""

from __future__ import annotations

import re

import pytest

from jaxgrad.data import synthetic as syn
from jaxgrad.data.examples import SPLITS, extract_marker_answer
from jaxgrad.data.tokenizer import DEFAULT_CHARSET

SMALL = syn.SyntheticSpec(tasks=syn.TASKS, target="add", noisy=("add", "sort", "parity"),
                          unrelated=2, n_train=60, n_validation=20, n_test=20)


@pytest.fixture(scope="module")
def data():
    return syn.synthetic_sources(SMALL)


def _all(data, source):
    return [e for split in SPLITS for e in data.examples(split, source)]


def _solve(prompt: str) -> str:
    """Independent reference answer of a task prompt."""
    if m := re.fullmatch(r"(\d+)\+(\d+)=", prompt):
        return str(int(m[1]) + int(m[2]))
    if m := re.fullmatch(r"(\d+)-(\d+)=", prompt):
        return str(int(m[1]) - int(m[2]))
    word, arg = prompt[:-1].split(" ")
    return {"copy": arg, "rev": arg[::-1], "sort": "".join(sorted(arg)),
            "par": str(arg.count("1") % 2)}[word]


def test_same_seed_same_data_other_seed_other_data(data):
    again = syn.synthetic_sources(SMALL)
    other = syn.synthetic_sources(syn.SyntheticSpec(**{**SMALL.__dict__, "seed": 1}))
    for split in SPLITS:
        assert again.examples(split) == data.examples(split), f"{split} is not reproducible"
    assert other.examples("train", "add") != data.examples("train", "add"), "seed had no effect"


def test_sources_kinds_and_sizes(data):
    kinds = syn.source_kinds(SMALL)
    assert data.sources == list(kinds) == [*syn.TASKS, "noisy_add", "noisy_sort", "noisy_parity",
                                           "unrelated_0", "unrelated_1"]
    assert data.kinds == kinds and data.target == "add" and kinds["add"] == "target"
    assert {kinds[s] for s in syn.TASKS if s != "add"} == {"related"}
    assert kinds["noisy_sort"] == "noisy" and kinds["unrelated_1"] == "unrelated"
    for s in data.sources:
        assert (data.n("train", s), data.n("validation", s), data.n("test", s)) == (60, 20, 20), s


@pytest.mark.parametrize("task", syn.TASKS)
def test_task_answers_are_correct(data, task):
    for e in _all(data, task):
        assert e["answer"] == _solve(e["prompt"]), f"{task}: {e}"
        assert extract_marker_answer(e["completion"]) == e["answer"], f"{task}: {e}"
        assert data.extract_answer(e["completion"]) == e["answer"]


def _check_add_steps(prompt, completion):
    """Replays the written column sums: digits, carries and the final answer must agree."""
    a, b = re.fullmatch(r"(\d+)\+(\d+)=", prompt).groups()
    steps, answer = completion.split("#")
    width = max(len(a), len(b))
    a, b = a.zfill(width)[::-1], b.zfill(width)[::-1]
    carry, digits = 0, []
    for i, step in enumerate(steps.split(",")):
        m = re.fullmatch(r"(\d)\+(\d)(\+1)?=(\d+)", step)
        assert m, f"malformed step {step!r} in {completion!r}"
        assert (int(m[1]), int(m[2]), bool(m[3])) == (int(a[i]), int(b[i]), bool(carry)), \
            f"step {i} of {prompt}{completion} uses the wrong digits or carry"
        assert int(m[4]) == int(a[i]) + int(b[i]) + carry, f"wrong column sum in {step!r}"
        carry, digits = int(m[4]) // 10, digits + [int(m[4]) % 10]
    assert i == width - 1, "one step per column"
    value = carry * 10 ** width + int("".join(map(str, digits[::-1])))
    assert answer == str(value), f"{prompt}{completion}: the steps give {value}"


def test_addition_steps_write_out_carries(data):
    for task in ("add", "successor", "add_digit"):
        for e in _all(data, task):
            _check_add_steps(e["prompt"], e["completion"])
    assert all(1 <= int(e["prompt"].split("+")[1][:-1]) <= 9 for e in _all(data, "add_digit"))
    assert syn.addition(345, 678)[1] == "5+8=13,4+7+1=12,3+6+1=10#1023"


def test_subtraction_steps_write_out_borrows(data):
    assert syn.subtraction(745, 278)[1] == "15-8=7,14-7-1=6,7-2-1=4#467"
    for e in _all(data, "sub"):
        steps, answer = e["completion"].split("#")
        digits = []
        for step in steps.split(","):
            m = re.fullmatch(r"(\d+)-(\d)(-1)?=(\d)", step)
            assert m, f"malformed step {step!r} in {e}"
            assert int(m[1]) - int(m[2]) - bool(m[3]) == int(m[4]), f"wrong difference {step!r}"
            digits.append(m[4])
        assert int("".join(digits[::-1])) == int(answer), e


def test_noisy_sources_have_wrong_answers(data):
    for name in ("noisy_add", "noisy_sort", "noisy_parity"):
        exs = _all(data, name)
        task = name[len("noisy_"):]
        prompt_shape = {"add": r"\d+\+\d+=", "sort": r"sort [a-z]+>", "parity": r"par [01]+>"}
        for e in exs:
            assert re.fullmatch(prompt_shape[task], e["prompt"]), f"{name} prompt format: {e}"
            assert e["answer"] != _solve(e["prompt"]), f"{name} has a correct label: {e}"
            assert extract_marker_answer(e["completion"]) == e["answer"]


def test_unrelated_sources_are_random_strings(data):
    exs = _all(data, "unrelated_0")
    for e in exs:
        assert re.fullmatch(r"[a-z0-9]+\?", e["prompt"]) and re.fullmatch(r"[A-Z]+",
                                                                           e["completion"]), e
    assert _all(data, "unrelated_0") != _all(data, "unrelated_1"), "unrelated sources repeat"


def test_prompts_unique_and_target_heldout_prompts_private(data):
    for s in data.sources:
        prompts = [e["prompt"] for e in _all(data, s)]
        assert len(prompts) == len(set(prompts)), f"{s}: a prompt appears in two examples"
    held = {e["prompt"] for split in ("validation", "test") for e in data.examples(split, "add")}
    for s in data.sources:
        if s != "add":
            leaked = held & {e["prompt"] for e in _all(data, s)}
            assert not leaked, f"{s} contains target held-out prompts {sorted(leaked)[:3]}"


def test_lengths_and_charset_at_defaults():
    data = syn.synthetic_sources()
    exs = [e for split in SPLITS for e in data.examples(split)]
    longest = max(len(e["prompt"]) + len(e["completion"]) for e in exs)
    assert longest <= 39, f"default examples should fit 48 tokens with specials, got {longest}"
    assert {c for e in exs for c in e["prompt"] + e["completion"]} <= set(DEFAULT_CHARSET)
    assert sum(data.n("train", s) for s in data.sources) == 200 * len(data.sources)


def test_adding_a_source_leaves_the_others_unchanged():
    base = syn.SyntheticSpec(tasks=("add", "copy"), noisy=(), unrelated=0, n_train=30,
                             n_validation=5, n_test=5)
    more = syn.SyntheticSpec(tasks=("add", "copy", "reverse"), noisy=("add",), unrelated=1,
                             n_train=30, n_validation=5, n_test=5)
    a, b = syn.synthetic_sources(base), syn.synthetic_sources(more)
    for s in ("add", "copy"):
        assert a.examples("train", s) == b.examples("train", s), f"{s} moved when sources added"


def test_spec_validation():
    with pytest.raises(ValueError, match="data.synthetic.tasks has unknown tasks \\['mul'\\]"):
        syn.SyntheticSpec(tasks=("add", "mul"))
    with pytest.raises(ValueError, match="data.synthetic.target 'sub' must be one of "
                                         "data.synthetic.tasks"):
        syn.SyntheticSpec(tasks=("add",), target="sub", noisy=())
    with pytest.raises(ValueError, match="n_train must be an int >= 1"):
        syn.SyntheticSpec(n_train=0)
    with pytest.raises(ValueError, match="could not draw 300 distinct prompts"):
        syn.synthetic_sources(syn.SyntheticSpec(tasks=("successor",), target=None, noisy=(),
                                                unrelated=0, max_digits=2))


def test_generic_text_is_none_of_the_tasks(data):
    lines = syn.generic_text(500, seed=3)
    assert lines == syn.generic_text(500, seed=3), "generic_text must be reproducible"
    assert lines != syn.generic_text(500, seed=4)
    assert len(lines) == 500 and all(0 < len(t) <= 40 for t in lines)
    prompts = {e["prompt"] for s in data.sources for e in _all(data, s)}
    for t in lines:
        assert not set(t) & set(syn.TASK_SYMBOLS), f"task symbol in generic text {t!r}"
        assert not t.startswith(syn.TASK_KEYWORDS) and t not in prompts, t
    assert set("".join(lines)) <= set(DEFAULT_CHARSET)
    assert len(set(lines)) > 450, "generic text should be varied"


@pytest.mark.parametrize("tasks", ["add,sub", ("add,sub",), ("add", " sub")])
def test_task_lists_as_typed_on_a_command_line(tasks):
    """--config.data.synthetic.tasks=add,sub arrives as ("add,sub",): two tasks, not an unknown
    one (it was refused as unknown task 'add,sub')."""
    spec = syn.SyntheticSpec(tasks=tasks, target="add", noisy="add", unrelated=0, n_train=4,
                             n_validation=2, n_test=2)
    assert spec.tasks == ("add", "sub") and spec.noisy == ("add",)
