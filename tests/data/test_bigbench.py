"""BIG-bench JSON tasks as sources (jaxgrad.data.bigbench) and planted label noise.

The task files are written here, in the layout of bigbench/benchmark_tasks (the real data carry a
canary and are never committed); the expected prompts follow BIG-bench's default_format_fn.
"""

from __future__ import annotations

import json
import os

import pytest

from helpers.data import write_text
from jaxgrad.data import bigbench, extract_leading_answer, load_sources


STRATEGY = {
    "name": "strategyqa",
    "keywords": ["implicit reasoning", "logical reasoning", "zero-shot"],
    "append_choices_to_input": False,
    "examples": [
        {"input": f"Question {i}?", "target_scores": {"Yes": int(i % 2 == 0), "No": int(i % 2)},
         "target": f"{'Yes' if i % 2 == 0 else 'No'}. Reason number {i}. More text."}
        for i in range(12)
    ],
}
SORTING = {
    "name": "word_sorting",
    "keywords": ["algorithms"],
    "task_prefix": "Sort the following words alphabetically:",
    "example_input_prefix": "\nList: ",
    "example_output_prefix": "\nSorted: ",
    "examples": [{"input": f"w{i} a{i}", "target": [f"a{i} w{i}", "other"]} for i in range(12)],
}
CHOICE = {  # multiple choice only; BIG-bench's default prefixes; choices appended to the input
    "name": "choice",
    "keywords": ["common sense", "multiple choice"],
    "examples": [{"input": f"Pick {i}", "target_scores": {"x": 0, "right": 1, "y": 0.5}}
                 for i in range(12)],
}


def write_task(root, name, data):
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "task.json"), "w") as f:
        json.dump(data, f)
    return os.path.join(path, "task.json")


@pytest.fixture
def tasks_root(tmp_path):
    root = str(tmp_path / "benchmark_tasks")
    write_task(root, "strategyqa", STRATEGY)
    write_task(root, "word_sorting", SORTING)
    write_task(root, "choice", CHOICE)
    # A task with subtasks: the container has keywords and no examples; it is skipped.
    write_task(root, "arith", {"name": "arith", "keywords": ["mathematics"], "examples": []})
    write_task(root, "arith/two", {"name": "two", "keywords": ["mathematics", "arithmetic"],
                                   "examples": [{"input": f"{i}+{i}", "target": str(2 * i)}
                                                for i in range(12)]})
    return root


def test_prompt_completion_answer_follow_bigbench_layout(tasks_root):
    rows, keywords = bigbench.read_tasks(tasks_root)
    by_source = {}
    for src, prompt, completion, answer in rows:
        by_source.setdefault(src, []).append((prompt, completion, answer))
    assert sorted(by_source) == ["arith/two", "choice", "strategyqa", "word_sorting"]
    assert keywords["strategyqa"] == ("implicit reasoning", "logical reasoning", "zero-shot")
    # Answer-first target: the whole target is the completion, the best choice the answer.
    assert by_source["strategyqa"][1] == ("\nQ: Question 1?\nA: ",
                                          "No. Reason number 1. More text.", "No")
    # task_prefix + custom prefixes; the first of a list of targets.
    assert by_source["word_sorting"][0] == (
        "Sort the following words alphabetically:\nList: w0 a0\nSorted: ", "a0 w0", "a0 w0")
    # Multiple choice only: choices appended (each after "\n  choice: "), the best one completes.
    prompt, completion, answer = by_source["choice"][3]
    assert completion == answer == "right"
    assert prompt.startswith("\nQ: Pick 3\n  choice: ") and prompt.endswith("\nA: ")
    listed = prompt[len("\nQ: Pick 3"):-len("\nA: ")].split("\n  choice: ")[1:]
    assert sorted(listed) == ["right", "x", "y"]
    # The order is drawn from the input: the same in every run, not always sorted.
    again, _ = bigbench.read_tasks(tasks_root, tasks=["choice"])
    assert [r[1] for r in again] == [p for p, _, _ in by_source["choice"]]
    orders = {tuple(p.split("\n  choice: ")[1:]) for p, _, _ in by_source["choice"]}
    assert len(orders) > 1
    assert by_source["arith/two"][5] == ("\nQ: 5+5\nA: ", "10", "10")


def test_path_forms_and_names(tasks_root):
    one = os.path.join(tasks_root, "strategyqa", "task.json")
    assert [t.name for t in bigbench.list_tasks(one)] == ["strategyqa"]
    assert [t.name for t in bigbench.list_tasks(os.path.join(tasks_root, "arith"))] == ["arith/two"]
    both = bigbench.list_tasks([one, os.path.join(tasks_root, "word_sorting")])
    assert [(t.name, t.num_examples) for t in both] == [("strategyqa", 12), ("word_sorting", 12)]
    tasks = bigbench.list_tasks(tasks_root)
    assert bigbench.select_tasks(tasks, any_of=["common sense", "implicit reasoning"]) == [
        "choice", "strategyqa"]
    assert bigbench.select_tasks(tasks, none_of=["implicit reasoning", "common sense"]) == [
        "arith/two", "word_sorting"]
    assert bigbench.select_tasks(tasks, min_examples=13) == []


def test_errors_name_the_file_and_example(tasks_root, tmp_path):
    bad = write_task(str(tmp_path / "bad"), "t", {"examples": [{"input": "a", "target": "b"},
                                                               {"input": "no target"}]})
    with pytest.raises(ValueError, match=r"t/task.json: examples\[1\]: has neither 'target'"):
        bigbench.read_tasks(bad)
    tie = write_task(str(tmp_path / "tie"), "t", {"examples": [
        {"input": "a", "target_scores": {"p": 0, "q": 0}}]})
    with pytest.raises(ValueError, match=r"examples\[0\]: target_scores has no correct choice"):
        bigbench.read_tasks(tie)
    broken = tmp_path / "broken" / "task.json"
    broken.parent.mkdir()
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken/task.json: not valid JSON"):
        bigbench.read_tasks(str(broken))
    with pytest.raises(ValueError, match=r"\['nope'\] are not under .*available: \['arith/two', "
                       r"'choice', 'strategyqa', 'word_sorting'\]"):
        bigbench.read_tasks(tasks_root, tasks=["nope", "arith/two"])
    with pytest.raises(ValueError, match=r"'arith' holds only subtasks: \['arith/two'\]"):
        bigbench.read_tasks(tasks_root, tasks=["arith"])
    with pytest.raises(TypeError, match="sources must be a list of source names, got the string"):
        load_sources({"format": "bigbench", "path": tasks_root, "sources": "strategyqa"})
    with pytest.raises(ValueError, match="hub is not supported"):
        load_sources({"format": "bigbench", "path": tasks_root, "hub": "x"})
    with pytest.raises(ValueError, match="the target's kind is always 'target'"):
        load_sources({"format": "bigbench", "path": tasks_root, "target": "strategyqa",
                      "kinds": {"strategyqa": "related"}})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bigbench.find_task_files(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no task.json"):
        bigbench.find_task_files(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="takes no columns"):
        load_sources({"format": "bigbench", "path": tasks_root, "columns": {"prompt": "x"}})


def test_load_sources_answers_kinds_and_label_noise(tasks_root):
    spec = {"format": "bigbench", "path": tasks_root, "target": "strategyqa",
            "sources": ["strategyqa", "choice", "word_sorting"], "validation": 3, "test": 3,
            "noisy": ["strategyqa"], "kinds": {"choice": "related", "word_sorting": "unrelated"}}
    data = load_sources(spec)
    assert data.sources == ["strategyqa", "choice", "word_sorting", "noisy_strategyqa"]
    assert data.kinds == {"strategyqa": "target", "choice": "related",
                          "word_sorting": "unrelated", "noisy_strategyqa": "noisy"}
    assert data.answer_format == "leading"
    assert data.extract_answer(" Yes. Because it is.") == "Yes"
    for split in ("train", "validation", "test"):
        clean = data.examples(split, "strategyqa")
        noisy = data.examples(split, "noisy_strategyqa")
        # Same prompts, in the same split (nothing held out is trained on) ...
        assert [e["prompt"] for e in noisy] == [e["prompt"] for e in clean]
        # ... each with another example's completion and answer, from the same split.
        assert all(n["completion"] != c["completion"] for n, c in zip(noisy, clean))
        assert sorted(e["completion"] for e in noisy) == sorted(e["completion"] for e in clean)
        assert all(e["answer"] == extract_leading_answer(e["completion"]) for e in noisy)
        assert all(e["example_id"].startswith("noisy_strategyqa/") for e in noisy)
    # Deterministic: the same files and seed give the same data, ids included.
    again = load_sources(spec)
    assert again.examples("train") == data.examples("train")
    with pytest.raises(ValueError, match="already exists"):
        data.with_label_noise(["strategyqa"])
    with pytest.raises(ValueError, match=r"label noise \(noisy\) names sources \['nope'\]"):
        data.with_label_noise(["nope"])


def test_bigbench_targets_keep_their_literal(tmp_path):
    task = tmp_path / "numbers"
    task.mkdir()
    write_text(task / "task.json", '{"name": "numbers", "keywords": ["mathematics"], "examples": ['
                '{"input": "half of 5?", "target": 2.50},'
                '{"input": 7, "target": [18, "eighteen"]},'
                '{"input": "pick", "target_scores": {"small": 0.5, "big": 1.0}}]}')
    rows, _ = bigbench.read_tasks(str(task))
    assert [(p.split("Q: ")[1].split("\n")[0], c) for _, p, c, _ in rows] == \
        [("half of 5?", "2.50"), ("7", "18"), ("pick", "big")], \
        "JSON numbers keep their literal; numeric target_scores still pick the best choice"
