"""BIG-bench JSON tasks as sources: one source per task or subtask, text as the task writes it.

BIG-bench (Srivastava et al., 2022, https://github.com/google/BIG-bench) keeps each JSON task in
``bigbench/benchmark_tasks/<task>[/<subtask>]/task.json``: a ``keywords`` list (skill tags such as
"logical reasoning", "common sense", "mathematics"), optional prompt pieces and ``examples``, each
with an ``input`` and a ``target`` (a string or a list of acceptable strings) and/or
``target_scores`` (choice -> score, the best choice correct).

An example becomes (the layout of BIG-bench's own ``default_format_fn`` and ``JsonTask``)::

    prompt     = task_prefix + example_input_prefix + input [+ choices] + example_output_prefix
    completion = target (the first, for a list) or else the best-scoring choice
    answer     = the best-scoring choice when target_scores exist, else the completion

with BIG-bench's defaults where a task leaves a field out: ``task_prefix=""``,
``example_input_prefix="\\nQ: "``, ``example_output_prefix="\\nA: "``, ``choice_prefix="\\n
choice: "``, ``append_choices_to_input=True``. Choices appended to the input are listed in an
order drawn per example from the sha1 of its input (stable across runs; BIG-bench draws its
own order from a seeded numpy stream, so the order differs from BIG-bench's, the set does not).
A task whose examples carry only ``target_scores`` (multiple choice) is thus trained as prompt +
correct choice. Ties for the best score take the first choice listed, as BIG-bench does.

**Answer-first targets.** Some tasks write the answer first and the reasoning after it:
``strategyqa``'s target is ``"Yes. College commencement ceremonies often happen ..."`` with
``target_scores`` ``{"Yes": 1, "No": 0}``. The whole target is the completion (the rationale is
the chain of thought the model is trained on, the paper's CoT setting) and the answer is the
best choice, "Yes". Accuracy reads the answer back from a generation with the ``leading`` answer
format (:func:`jaxgrad.data.examples.extract_leading_answer`): the text before the first sentence
end (". ", a newline, or a final "."), so "Yes. Because ..." and "Yes." both give "Yes". Stored
answers go through the same function, so both sides of the exact match are alike.

Sources are named after the task directory, ``task`` or ``task/subtask`` (a subtask is a
directory with a ``task.json`` whose parent directory also has one). Container tasks without
examples (``arithmetic/task.json``, which only lists subtasks) are skipped.

Text is kept as the task file writes it (:func:`jaxgrad.data.readers.json_loads`): a target
written as the JSON number ``2.50`` is the completion ``"2.50"``, never ``"2.5"``.

Only the standard library and numpy are used; nothing here reaches the network. The BIG-bench
data carry a canary string asking that they never enter a pretraining corpus: jaxgrad does not
ship them; ``scripts/prepare_real.py`` fetches the ``bigbench`` source distribution at
preparation time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Iterable, Sequence

import numpy as np

from jaxgrad.data.readers import json_loads, json_text

TASK_FILE = "task.json"
DEFAULT_PREFIXES = {
    "task_prefix": "",
    "example_input_prefix": "\nQ: ",
    "example_output_prefix": "\nA: ",
    "choice_prefix": "\n  choice: ",
}


@dataclasses.dataclass(frozen=True)
class BigBenchTask:
    """One task file: ``name`` (``task`` or ``task/subtask``), ``path`` to its task.json,
    ``keywords`` (the task's skill tags) and ``num_examples``."""

    name: str
    path: str
    keywords: tuple[str, ...]
    num_examples: int


def _load_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json_loads(f.read())  # numbers keep their literal: "2.50" stays "2.50"
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected a BIG-bench task.json") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a JSON {type(data).__name__}; expected a BIG-bench task "
                         "object with 'examples'")
    return data


def _task_name(task_file: str) -> str:
    task_dir = os.path.dirname(os.path.abspath(task_file))
    parent = os.path.dirname(task_dir)
    if os.path.isfile(os.path.join(parent, TASK_FILE)):
        return f"{os.path.basename(parent)}/{os.path.basename(task_dir)}"
    return os.path.basename(task_dir)


def find_task_files(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The task.json files under ``path``, sorted.

    ``path`` is a task.json, a task directory (its task.json and those of its subtasks), a
    directory of tasks (e.g. ``bigbench/benchmark_tasks``: every task.json below it), or a list
    of any of these. Raises FileNotFoundError naming a path that does not exist or holds no
    task.json.
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    files: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isfile(p):
            files.append(p)
            continue
        if not os.path.isdir(p):
            raise FileNotFoundError(f"BIG-bench path {p} does not exist; expected a task.json, a "
                                    "task directory or a directory of tasks")
        found = sorted(os.path.join(root, TASK_FILE) for root, _, names in os.walk(p)
                       if TASK_FILE in names)
        if not found:
            raise FileNotFoundError(f"{p}: no {TASK_FILE} in it or below it; expected a BIG-bench "
                                    "task directory (bigbench/benchmark_tasks/<task>)")
        files.extend(found)
    return list(dict.fromkeys(files))


def list_tasks(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[BigBenchTask]:
    """Every task with examples under ``path`` (see :func:`find_task_files`), with keywords."""
    tasks = []
    for f in find_task_files(path):
        data = _load_json(f)
        n = len(data.get("examples") or ())
        if n:
            tasks.append(BigBenchTask(_task_name(f), f, tuple(data.get("keywords") or ()), n))
    return tasks


def select_tasks(tasks: Iterable[BigBenchTask], *, any_of: Sequence[str] = (),
                 none_of: Sequence[str] = (), min_examples: int = 0) -> list[str]:
    """Names of the tasks that carry at least one keyword of ``any_of`` (when given), none of
    ``none_of``, and at least ``min_examples`` examples: a rule for picking sources by skill."""
    out = []
    for t in tasks:
        kw = set(t.keywords)
        if any_of and not kw & set(any_of):
            continue
        if kw & set(none_of) or t.num_examples < min_examples:
            continue
        out.append(t.name)
    return out


def _best_choice(scores: dict, where: str) -> str:
    if not isinstance(scores, dict) or not scores:
        raise ValueError(f"{where}: target_scores must be a non-empty object of choice -> score")
    values = list(scores.values())
    best = max(values)
    if (len(values) == 1 and best == 0) or (len(values) > 1 and best <= min(values)):
        raise ValueError(f"{where}: target_scores has no correct choice (every score equal): "
                         f"{scores!r:.200}")
    return next(k for k, v in scores.items() if v == best)


def _choices_text(scores: dict, text: str, choice_prefix: str) -> str:
    names = sorted(scores)
    seed = int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "little")
    order = np.random.default_rng(seed).permutation(len(names))
    return choice_prefix + choice_prefix.join(names[i] for i in order)


def _as_text(value: Any) -> str:
    """A field as the task file writes it: a JSON number keeps its literal (``18`` -> ``"18"``,
    ``2.50`` -> ``"2.50"``), ``true`` stays ``"true"``, ``null`` is ``""``."""
    text = json_text(value)
    return "" if text is None else text


def format_example(task: dict, example: dict, where: str = "example") -> tuple[str, str, str]:
    """``(prompt, completion, raw answer)`` of one BIG-bench example (see the module docstring).

    Raises ValueError naming ``where`` when the example has no ``input``, neither ``target`` nor
    ``target_scores``, or no correct choice.
    """
    if not isinstance(example, dict) or "input" not in example:
        raise ValueError(f"{where}: expected an object with 'input' and 'target' and/or "
                         f"'target_scores', got {example!r:.200}")
    pre = {k: str(task.get(k, v)) for k, v in DEFAULT_PREFIXES.items()}
    text = _as_text(example["input"])
    scores = example.get("target_scores")
    target = example.get("target")
    if scores is None and target is None:
        raise ValueError(f"{where}: has neither 'target' nor 'target_scores'")
    if scores is not None and task.get("append_choices_to_input", True):
        text = text + _choices_text(scores, text, pre["choice_prefix"])
    if isinstance(target, list):
        if not target:
            raise ValueError(f"{where}: 'target' is an empty list")
        target = target[0]
    best = _best_choice(scores, where) if scores is not None else None
    completion = _as_text(target) if target is not None else best
    prompt = pre["task_prefix"] + pre["example_input_prefix"] + text + pre["example_output_prefix"]
    return prompt, completion, best if best is not None else completion


def read_tasks(path: Any, *, tasks: Sequence[str] | None = None
               ) -> tuple[list[tuple[str, str, str, str]], dict[str, tuple[str, ...]]]:
    """Rows ``(source, prompt, completion, raw answer)`` of the BIG-bench tasks under ``path``,
    and each source's keywords.

    Args:
      path: see :func:`find_task_files`.
      tasks: read only these task names (``task`` or ``task/subtask``); None reads all.

    Raises:
      ValueError naming the task file and example index of a malformed example, or the asked-for
      task names that are not under ``path`` (with the names that are).
    """
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a list of task names, got the string {tasks!r}")
    files = find_task_files(path)
    wanted = None if tasks is None else set(tasks)
    rows: list[tuple[str, str, str, str]] = []
    keywords: dict[str, tuple[str, ...]] = {}
    for f in files:
        name = _task_name(f)
        if wanted is not None and name not in wanted:
            continue
        data = _load_json(f)
        examples = data.get("examples") or []
        if not examples:
            continue
        if name in keywords:
            raise ValueError(f"{f}: task name {name!r} appears twice under {path!r}")
        keywords[name] = tuple(data.get("keywords") or ())
        for i, ex in enumerate(examples):
            rows.append((name, *format_example(data, ex, where=f"{f}: examples[{i}]")))
    if wanted is not None:
        missing = sorted(wanted - set(keywords))
        if missing:
            available = [t.name for t in list_tasks(path)]
            hints = [f"{m!r} holds only subtasks: {[a for a in available if a.startswith(m + '/')]}"
                     for m in missing if any(a.startswith(m + "/") for a in available)]
            raise ValueError(f"BIG-bench tasks {missing} are not under {path!r} (or have no "
                             f"examples); " + "; ".join(hints + [f"available: {available}"]))
    return rows, keywords
