"""Multi-source datasets: examples, deterministic per-source splits, loaders for local files.

GradEx asks which of n training *sources* help a *target* task, so every example carries the name
of its source. An example is a plain dict (JSON-serialisable, what every later stage reads)::

    {"example_id": "add/3f2a9c0d1b7e", "source": "add", "prompt": "12+9=",
     "completion": "2+9=11,1+0+1=2#21", "answer": "21"}

``example_id`` is ``<source>/<12 hex digits of sha1(prompt, completion)>``, with ``~1``, ``~2``...
appended to repeated (prompt, completion) pairs of one source in file order: the same in every run
and independent of row order. Ids are unique across a :class:`MultiSourceData` (every split, every
source): :meth:`MultiSourceData.from_examples` renumbers a repeated id (examples of one source read
by two ``read_examples`` calls) the same way, and the constructor refuses repeats. ``answer`` is
the final answer where the source defines one (None otherwise, and None for a blank answer: the
example is then not scored for accuracy); accuracy is the exact match of
:meth:`MultiSourceData.extract_answer` applied to a generated completion against it.

**Splits.** :class:`MultiSourceData` holds, for every source, the splits ``train`` /
``validation`` / ``test``. :meth:`MultiSourceData.from_examples` draws them per source with a seed
derived from the global seed and the source name (stable ``sha1``, not Python's salted ``hash``),
so adding a source never moves the examples of another. Selection uses the target's *validation*
split; ``test`` is held out for the final report (the authors' code selected on the target's test
split: not here). Split sizes follow :mod:`jaxgrad.common.counts` (a fraction in [0, 1), rounded, or a
whole count >= 1, whatever its Python type: ``2.0`` is two examples, ``1.0`` one) and are checked
when the data are loaded, before anything trains: every source needs at least one train example;
the target needs at least one validation example (the selection score) and, unless ``test`` is 0,
one test example; a count larger than a source is refused. Each refusal names the source, the
split and the setting to change.

**Duplicates.** Splits are drawn over the distinct (prompt, completion) pairs of a source, as the
loader built them, so all copies of a pair land in the same split (kept: they weight training as
the file does) and sizes count distinct pairs. A pair the target holds in its validation or test
split is removed from every other source (all its copies, every split), so no held-out target
example is trained on; a pair in the target's train split and in another source stays in both.
Both counts are in :attr:`MultiSourceData.duplicates`, in :meth:`MultiSourceData.summary` and in
a logged warning. Without duplicates the splits are those of earlier versions (same seed, same
examples in each split).

Loaders read local JSON, JSON Lines, CSV, TSV or parquet files, or a Hub dataset by name through
``datasets`` when online (imported lazily, so this module and ``jaxgrad.data`` stay importable
without it).

**Text as written.** Every text field is the text the file holds, never what a type inference
made of it: JSON and JSON Lines are parsed here with every number kept as its literal (``18`` ->
``"18"``, ``2.50`` -> ``"2.50"``, never ``"18.0"``), ``true`` / ``false`` as written, a nested
array or object as JSON text; CSV and TSV cells are read as strings by the ``csv`` module
(``"02139"``, ``"1.50"`` and ``"NA"`` stay as they are). Typed columns (parquet, pickle, Hub
datasets) are turned into text with ``str`` of the value (an int64 ``18`` -> ``"18"``, a float64
``18.0`` -> ``"18.0"``: the file stores a float; write strings to keep other spellings). A blank
cell, JSON ``null``, a missing key or a float NaN is blank: ``""`` in a text field (prompt,
completion, instruction, input, ...) and None for an answer (an empty or whitespace-only answer
too), so such an example is not scored for accuracy.

``format`` names the layout of the rows:

* ``generic``: prompt / completion columns, optional source and answer columns (names configurable).
* ``alpaca``: instruction / input / output and a skill column as the source; the prompt is built
  with the Stanford Alpaca template, without the ``### Input:`` block when the input is blank
  (empty, whitespace only, null or missing), so rows differing only in such inputs are the same
  example (a duplicate, see **Duplicates**).
* ``flan``: inputs / targets / ``_task_name``; a newline is appended to the inputs unless they end
  with a newline or a colon (the convention of the open-instruct FLAN v2 mixture).
* ``cot``: the reasoning-teacher layout, question / rationale / answer; the completion is
  ``"{rationale} Therefore, the answer is {answer}."`` and the answer is extracted back by
  :func:`extract_cot_answer`.
* ``bigbench``: BIG-bench JSON tasks (``path``: a task directory, a ``task.json``, a directory of
  tasks, or a list), one source per task or subtask, read by :mod:`jaxgrad.data.bigbench` (prompt
  and completion as BIG-bench lays them out; answers read back with :func:`extract_leading_answer`).

Ground truth for checking a ranking: ``kinds`` labels sources (``related``, ``unrelated``, ...),
and ``noisy`` plants label-noise copies ``noisy_<source>`` of chosen sources (their prompts with
the completions of other examples of the same source and split: see
:meth:`MultiSourceData.with_label_noise`).

Pickle files load only with ``allow_pickle=True``: unpickling runs arbitrary code from the file.
The paper's code shipped its data as pickles; convert them once (``df.to_parquet``) and load the
parquet instead.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from jaxgrad.common.counts import check_fraction_or_count, fraction_or_count
from jaxgrad.config import (DEFAULT_COLUMNS, DEFAULT_TEST, DEFAULT_VALIDATION,
                            FORMATS)

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
FILE_TYPES = ("json", "jsonl", "csv", "tsv", "parquet", "pickle")
_SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv",
             ".parquet": "parquet", ".pq": "parquet", ".pkl": "pickle", ".pickle": "pickle"}

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
COT_PROMPT = "Q: {question}\nA: "
COT_COMPLETION = "{rationale} Therefore, the answer is {answer}."
ANSWER_MARKER = "#"


# ----------------------------------------------------------------------------------------------
# Examples and answers.


def example_id(source: str, prompt: str, completion: str) -> str:
    """Stable id of an example: the source and a content hash (no running counter, no salt)."""
    digest = hashlib.sha1(f"{prompt}\x00{completion}".encode("utf-8")).hexdigest()[:12]
    return f"{source}/{digest}"


def make_examples(rows: Iterable[tuple[str, str, str, str | None]]) -> list[dict]:
    """Examples from ``(source, prompt, completion, answer)`` tuples, with stable ids.

    Repeated (source, prompt, completion) triples get ``~1``, ``~2``... appended to the id in the
    order given, so ids stay unique. An answer that is not a str is made one with ``str``; an
    empty or whitespace-only answer becomes None (no answer: not scored).
    """
    out, seen = [], {}
    for source, prompt, completion, answer in rows:
        for name, value in (("source", source), ("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str):
                raise TypeError(f"example {name} must be a str, got {type(value).__name__}: "
                                f"{value!r:.80}")
        if not source:
            raise ValueError("example source must be a non-empty string")
        if answer is not None and not isinstance(answer, str):
            answer = str(answer)
        if answer is not None and not answer.strip():
            answer = None
        eid = example_id(source, prompt, completion)
        count = seen.get(eid, 0)
        seen[eid] = count + 1
        if count:
            eid = f"{eid}~{count}"
        out.append({"example_id": eid, "source": source, "prompt": prompt,
                    "completion": completion, "answer": answer})
    return out


def extract_marker_answer(text: str) -> str:
    """The text after the last ``#`` (the whole text when there is none), stripped."""
    return text.rsplit(ANSWER_MARKER, 1)[-1].strip()


_COT_ANSWER = re.compile(r"answer is\s*(.*?)\s*\.?\s*$", re.DOTALL)


def extract_cot_answer(text: str) -> str | None:
    """The answer of a ``... Therefore, the answer is X.`` completion (None when absent).

    Only the first line after the last "answer is" counts, so generations that run on are cut.
    """
    idx = text.rfind("answer is")
    if idx < 0:
        return None
    tail = text[idx:].split("\n", 1)[0]
    match = _COT_ANSWER.match(tail)
    return match.group(1).strip() if match else None


_SENTENCE_END = re.compile(r"\.(?:\s|$)|\n")


def extract_leading_answer(text: str) -> str:
    """The text before the first sentence end (". ", a newline, or a final "."), stripped.

    For answer-first completions: ``"Yes. Because ..."`` -> ``"Yes"``, ``"109"`` -> ``"109"``,
    ``"3.5 hours."`` -> ``"3.5 hours"``.
    """
    text = text.lstrip()
    match = _SENTENCE_END.search(text)
    return (text[:match.start()] if match else text).strip()


def extract_full_answer(text: str) -> str:
    """The whole completion, stripped: for sources whose completion is the answer."""
    return text.strip()


ANSWER_FORMATS: dict[str, Callable[[str], str | None]] = {
    "marker": extract_marker_answer,
    "cot": extract_cot_answer,
    "full": extract_full_answer,
    "leading": extract_leading_answer,
}


# ----------------------------------------------------------------------------------------------
# The multi-source container.


_WARNED: set[str] = set()


def _warn_once(line: str) -> None:
    """Log ``line`` once per process: every pipeline stage loads the same data again."""
    if line and line not in _WARNED:
        _WARNED.add(line)
        log.warning("%s", line)


def seed_for(seed: int, name: str) -> list[int]:
    """A numpy seed sequence for ``name`` under ``seed``: stable across runs and processes."""
    return [int(seed), int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "little")]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _unique_ids(examples: list[dict]) -> list[dict]:
    """``examples`` with every repeated ``example_id`` after the first renumbered ``<base>~k``
    (the smallest k not taken), as :func:`make_examples` numbers repeats: ids stay unique when
    examples of one source come from several ``read_examples`` calls."""
    ids = [e.get("example_id") for e in examples]
    if len(set(ids)) == len(ids):
        return examples
    taken, seen, out = set(ids), set(), []
    for e in examples:
        eid = e.get("example_id")
        if eid is not None and eid in seen:
            base, k = re.sub(r"~\d+$", "", eid), 1
            while f"{base}~{k}" in taken:
                k += 1
            eid = f"{base}~{k}"
            taken.add(eid)
            e = dict(e, example_id=eid)
        seen.add(eid)
        out.append(e)
    return out


class MultiSourceData:
    """Examples of several sources, each split into train / validation / test.

    Attributes:
      sources: source names in a fixed order: the configured order when one was given, sorted
        otherwise. ``source_index`` in batches indexes this list.
      target: the target source (its validation split scores subsets) or None.
      kinds: source -> kind; synthetic data uses "target", "related", "noisy", "unrelated"; loaded
        data "target" for the target and "unknown" for the rest.
      answer_format: key of :data:`ANSWER_FORMATS` used by :meth:`extract_answer`, or None when
        the sources define no answers.
      duplicates: what :meth:`from_examples` did with repeated (prompt, completion) pairs:
        ``{"repeated": {source: rows that repeat a pair of the same source (kept, in the split of
        its first copy)}, "removed": {source: rows removed because the target holds their pair
        in its validation or test split}}``; sources without any are left out (empty dicts when
        nothing repeats, and for data not built by :meth:`from_examples`).
    """

    def __init__(self, splits: Mapping[str, Mapping[str, Sequence[dict]]], *,
                 sources: Sequence[str] | None = None, target: str | None = None,
                 kinds: Mapping[str, str] | None = None, answer_format: str | None = None,
                 duplicates: Mapping[str, Mapping[str, int]] | None = None):
        """Wraps already split examples: ``splits[split][source] -> list of example dicts``.

        Raises ValueError for an ``example_id`` that appears twice (any splits, any sources).
        """
        if set(splits) != set(SPLITS):
            raise ValueError(f"splits must have exactly the keys {SPLITS}, got {sorted(splits)}")
        names = set()
        for split in SPLITS:
            names |= set(splits[split])
        if sources is None:
            sources = sorted(names)
        sources = list(sources)
        if len(set(sources)) != len(sources):
            raise ValueError(f"sources has repeated names: {sources}")
        extra = names - set(sources)
        if extra:
            raise ValueError(f"splits hold sources {sorted(extra)} missing from sources={sources}")
        if target is not None and target not in sources:
            raise ValueError(f"target {target!r} is not one of the sources {sources}")
        if answer_format is not None and answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format {answer_format!r} is unknown; expected one of "
                             f"{sorted(ANSWER_FORMATS)} or None")
        self._splits = {s: {name: [dict(e) for e in splits[s].get(name, ())] for name in sources}
                        for s in SPLITS}
        for s in SPLITS:
            for name, exs in self._splits[s].items():
                for e in exs:
                    if e.get("source") != name:
                        raise ValueError(f"example {e.get('example_id')!r} in split {s!r} under "
                                         f"source {name!r} has source {e.get('source')!r}")
        where: dict[str, str] = {}
        for s in SPLITS:
            for name, exs in self._splits[s].items():
                for e in exs:
                    eid = e.get("example_id")
                    if eid is None:
                        continue
                    if eid in where:
                        raise ValueError(f"example_id {eid!r} appears twice ({where[eid]} and "
                                         f"{s}/{name}); ids must be unique")
                    where[eid] = f"{s}/{name}"
        self.sources = sources
        self.target = target
        default_kinds = {n: ("target" if n == target else "unknown") for n in sources}
        stray = sorted(set(kinds or {}) - set(sources))
        if stray:
            raise ValueError(f"kinds names sources {stray} that are not in sources={sources}")
        self.kinds = dict(default_kinds, **(kinds or {}))
        self.answer_format = answer_format
        duplicates = duplicates or {}
        self.duplicates = {k: {n: int(c) for n, c in (duplicates.get(k) or {}).items() if c}
                           for k in ("repeated", "removed")}

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_examples(cls, examples: Iterable[dict], *, validation: float | int = DEFAULT_VALIDATION,
                      test: float | int = DEFAULT_TEST, seed: int = 0, sources: Sequence[str] | None = None,
                      target: str | None = None, max_examples: int | None = None,
                      kinds: Mapping[str, str] | None = None,
                      answer_format: str | None = None,
                      setting_prefix: str = "") -> "MultiSourceData":
        """Splits examples per source, deterministically, and checks every split size.

        Each source's distinct (prompt, completion) pairs are permuted with the seed
        ``(seed, sha1(source))`` and cut into validation, test and train; every copy of a pair
        goes to its pair's split. The target is split first; every pair it holds in validation or
        test is then removed from the other sources (see the module docstring, **Duplicates**).

        Args:
          examples: example dicts (see the module docstring), any source order. A repeated
            ``example_id`` is renumbered (``<id>~k``).
          validation: per source, a fraction in [0, 1) of its distinct pairs (rounded) or a
            whole count >= 1 of them (``jaxgrad.common.counts``: ``2.0`` is two).
          test: same for the test split; train gets the rest.
          seed: the split seed.
          sources: keep only these sources, in this order (None: all, sorted).
          target: the target source name, or None.
          max_examples: keep at most this many distinct pairs per source (a seeded random subset,
            drawn before splitting, after the removal above), or None for all.
          kinds: source -> kind; missing sources get "target"/"unknown".
          answer_format: see :data:`ANSWER_FORMATS`.
          setting_prefix: put before ``validation`` / ``test`` / ``max_examples`` in messages
            (:func:`load_sources` passes ``"data.files."``, the config section of its fields).

        Returns:
          The split data; within each split examples keep their input order.

        Raises:
          TypeError / ValueError: ``validation`` or ``test`` break the rule of
          :mod:`jaxgrad.common.counts`. ValueError, naming each source, split and setting at fault: a
          source left with no train example (counts too large for it, or all its pairs held out by
          the target); the target with no validation example, or no test example while ``test``
          is not 0.
        """
        val_name, test_name = f"{setting_prefix}validation", f"{setting_prefix}test"
        val_rule = check_fraction_or_count(validation, name=val_name, allow_zero=True)
        test_rule = check_fraction_or_count(test, name=test_name, allow_zero=True)
        if max_examples is not None and (isinstance(max_examples, bool)
                                         or not isinstance(max_examples, int) or max_examples < 1):
            raise ValueError(f"{setting_prefix}max_examples must be a positive int or None, got "
                             f"{max_examples!r}")
        by_source: dict[str, list[dict]] = {}
        for e in _unique_ids(list(examples)):
            by_source.setdefault(e["source"], []).append(e)
        if sources is not None:
            missing = [s for s in sources if s not in by_source]
            if missing:
                raise ValueError(f"sources {missing} have no examples; available: "
                                 f"{sorted(by_source)}")
            by_source = {s: by_source[s] for s in sources}

        def size(value: Any, rule: float | int, n: int, setting: str) -> int:
            if isinstance(rule, int) and rule > n:
                return rule  # refused below, naming the source
            return fraction_or_count(value, n, name=setting, allow_zero=True)

        def gives(setting: str, value: Any, rule: float | int, k: int, split: str) -> str:
            verb = "asks for" if isinstance(rule, int) else "gives"
            return f"{setting}={value!r} {verb} {_plural(k, split + ' example')}"

        splits: dict[str, dict[str, list[dict]]] = {s: {} for s in SPLITS}
        repeated: dict[str, int] = {}
        removed: dict[str, int] = {}
        problems: list[str] = []
        held_out: set[tuple[str, str]] = set()
        names = [target] if target in by_source else []
        names += [name for name in by_source if name != target]
        for name in names:
            exs = by_source[name]
            groups: dict[tuple[str, str], list[int]] = {}
            for i, e in enumerate(exs):
                groups.setdefault((e["prompt"], e["completion"]), []).append(i)
            keys = list(groups)
            if len(exs) > len(keys):
                repeated[name] = len(exs) - len(keys)
            order = np.random.default_rng(seed_for(seed, name)).permutation(len(keys))
            if name != target and held_out:
                drop = np.array([keys[g] in held_out for g in range(len(keys))], bool)
                if drop.any():
                    removed[name] = sum(len(groups[keys[g]]) for g in np.flatnonzero(drop))
                    order = order[~drop[order]]
            capped = max_examples is not None and len(order) > max_examples
            order = order[:max_examples] if capped else order
            n = len(order)
            n_val = size(validation, val_rule, n, val_name)
            n_test = size(test, test_rule, n, test_name)

            is_target = name == target
            notes = []
            if name in repeated:
                notes.append(f"{len(exs)} rows; splits count distinct (prompt, completion) pairs")
            if name in removed:
                notes.append(f"after removing {_plural(removed[name], 'row')} whose pair is in the "
                             f"target's validation/test split")
            if capped:
                notes.append(f"{setting_prefix}max_examples={max_examples}")
            desc = (f"{'target source' if is_target else 'source'} {name!r} has "
                    f"{_plural(n, 'example')}" + (f" ({'; '.join(notes)})" if notes else ""))
            val_part = gives(val_name, validation, val_rule, n_val, "validation")
            test_part = gives(test_name, test, test_rule, n_test, "test")
            # Examples the target needs: its validation and (when asked) test split, one train.
            need = max(n_val, 1) + (max(n_test, 1) if test_rule else 0) + 1
            if n_val + n_test >= n:
                problems.append(
                    f"{desc}: {val_part} and {test_part}, leaving {max(n - n_val - n_test, 0)} "
                    f"train examples (every source needs at least 1 train example); lower "
                    f"{val_name} / {test_name}"
                    + (f", or give the target at least {need} examples" if is_target else "")
                    + ("" if is_target else f" (or leave the source out of "
                                            f"{setting_prefix}sources)"))
                continue
            if is_target and n_val == 0:
                problems.append(
                    f"{desc}: {val_part}, and the selection scores sources by the loss on the "
                    f"target's validation split; set {val_name} to a count >= 1"
                    + (f", and give the target at least {need} examples (validation"
                       f"{', test' if test_rule else ''} and 1 train)" if n < need else ""))
                continue
            if is_target and test_rule and n_test == 0:
                problems.append(
                    f"{desc}: {test_part}, and the final report evaluates the target's test "
                    f"split; set {test_name} to a count >= 1 (or to 0 for no test split)"
                    + (f", and give the target at least {need} examples (validation, test "
                       f"and 1 train)" if n < need else ""))
                continue
            parts = {"validation": order[:n_val], "test": order[n_val:n_val + n_test],
                     "train": order[n_val + n_test:]}
            for split, idx in parts.items():
                rows = sorted(i for g in idx for i in groups[keys[g]])
                splits[split][name] = [exs[i] for i in rows]
            if is_target:
                held_out = {keys[g] for split in ("validation", "test") for g in parts[split]}
        if problems:
            raise ValueError("cannot split the data: " + ("\n  " if len(problems) > 1 else "")
                             + "\n  ".join(problems))
        data = cls(splits, sources=list(by_source) if sources is not None else None,
                   target=target, kinds=kinds, answer_format=answer_format,
                   duplicates={"repeated": repeated, "removed": removed})
        _warn_once(data.duplicates_line())
        return data

    # -- access ------------------------------------------------------------------------------

    def _check(self, split: str, sources: Sequence[str] | None) -> list[str]:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is unknown; expected one of {SPLITS}")
        if sources is None:
            return self.sources
        if isinstance(sources, str):
            sources = [sources]
        unknown = [s for s in sources if s not in self._splits[split]]
        if unknown:
            raise ValueError(f"unknown sources {unknown}; available: {self.sources}")
        return list(sources)

    def examples(self, split: str, sources: Sequence[str] | str | None = None) -> list[dict]:
        """Examples of one split, source by source in ``self.sources`` order (or the order given).

        Returns copies: editing them does not change this object.
        """
        return [dict(e) for s in self._check(split, sources) for e in self._splits[split][s]]

    def n(self, split: str, source: str) -> int:
        """Number of examples of ``source`` in ``split``."""
        return len(self._splits[split][self._check(split, [source])[0]])

    def source_index(self, source: str) -> int:
        """Position of ``source`` in :attr:`sources`."""
        if source not in self.sources:
            raise ValueError(f"unknown source {source!r}; available: {self.sources}")
        return self.sources.index(source)

    def extract_answer(self, text: str) -> str | None:
        """The final answer in a (generated) completion, per :attr:`answer_format`."""
        if self.answer_format is None:
            raise ValueError("these sources define no answers (answer_format is None)")
        return ANSWER_FORMATS[self.answer_format](text)

    def with_label_noise(self, sources: Sequence[str], *, seed: int = 0,
                         prefix: str = "noisy_") -> "MultiSourceData":
        """A copy with a label-noise source ``<prefix><source>`` added for each of ``sources``.

        In every split, the copy holds the source's prompts, each with the completion (and answer)
        of another example of the same source and split: the completions are permuted by a
        seeded cyclic shift of a random order, so no example keeps its own completion (unless two
        examples share one). Answers are not flipped on purpose: for a task with few distinct
        answers many stay right by chance (about half for yes/no tasks such as StrategyQA, whose
        copy is then noisy mainly in its rationales). Prompts of the target's validation and test
        splits stay in those splits, so nothing held out is trained on; a recombined row that
        equals a (prompt, completion) pair of the target's validation or test split is dropped
        (counted in ``duplicates["removed"]``), as :meth:`from_examples` drops such rows from
        every other source. The copies are appended to :attr:`sources`, with kind ``"noisy"``;
        ids are ``<prefix><source>/<hash>`` like any example's, unique across the copy's splits.

        Raises ValueError for an unknown source, a name already taken, a split with a single
        example (nothing to shuffle with), or a copy left without train examples.
        """
        sources = [sources] if isinstance(sources, str) else list(sources)
        unknown = [s for s in sources if s not in self.sources]
        if unknown:
            raise ValueError(f"label noise (noisy) names sources {unknown} that are not among the "
                             f"sources {self.sources}")
        splits = {s: {n: self.examples(s, n) for n in self.sources} for s in SPLITS}
        names = list(self.sources)
        held = set() if self.target is None else {
            (e["prompt"], e["completion"]) for s in ("validation", "test")
            for e in self._splits[s][self.target]}
        removed = dict(self.duplicates["removed"])
        for src in sources:
            self._check("train", [src])
            name = f"{prefix}{src}"
            if name in names:
                raise ValueError(f"label-noise source {name!r} already exists in {names}")
            names.append(name)
            rows = {}
            for split in SPLITS:
                exs = splits[split][src]
                if len(exs) == 1:
                    raise ValueError(f"source {src!r} has one {split} example: a label-noise copy "
                                     "needs at least two to shuffle")
                order = np.random.default_rng(seed_for(seed, f"{name}/{split}")).permutation(
                    len(exs))
                donor = {int(i): int(j) for i, j in zip(order, np.roll(order, -1))}
                rows[split] = [(name, e["prompt"], exs[donor[i]]["completion"],
                                exs[donor[i]]["answer"]) for i, e in enumerate(exs)]
                kept = [r for r in rows[split] if (r[1], r[2]) not in held]
                if len(kept) < len(rows[split]):
                    removed[name] = removed.get(name, 0) + len(rows[split]) - len(kept)
                    rows[split] = kept
            if splits["train"][src] and not rows["train"]:
                raise ValueError(f"label-noise copy {name!r} has no train example left: every "
                                 "recombined row is a pair of the target's validation/test split")
            made = iter(make_examples(r for split in SPLITS for r in rows[split]))  # ids unique
            for split in SPLITS:
                splits[split][name] = [next(made) for _ in rows[split]]
        kinds = dict(self.kinds, **{f"{prefix}{src}": "noisy" for src in sources})
        data = MultiSourceData(splits, sources=names, target=self.target, kinds=kinds,
                               answer_format=self.answer_format,
                               duplicates={"repeated": self.duplicates["repeated"],
                                           "removed": removed})
        if removed != self.duplicates["removed"]:
            _warn_once(data.duplicates_line())
        return data

    def duplicates_line(self) -> str:
        """One line on :attr:`duplicates` ("" when no pair repeats)."""
        parts = []
        rep, rem = self.duplicates["repeated"], self.duplicates["removed"]
        detail = lambda d: ", ".join(f"{k}={v}" for k, v in d.items())  # noqa: E731
        if rep:
            parts.append(f"{_plural(sum(rep.values()), 'row')} repeat a (prompt, completion) pair "
                         f"of their source, kept in the same split as its first copy "
                         f"({detail(rep)})")
        if rem:
            parts.append(f"{_plural(sum(rem.values()), 'row')} removed from other sources because "
                         f"the target {self.target!r} holds their pair in its validation/test "
                         f"split ({detail(rem)})")
        return ("duplicates: " + "; ".join(parts)) if parts else ""

    def summary(self) -> str:
        """One line per source: kind and split sizes; then a duplicates line when pairs repeat."""
        width = max(len(s) for s in self.sources) if self.sources else 0
        lines = []
        for s in self.sources:
            counts = " ".join(f"{split}={self.n(split, s)}" for split in SPLITS)
            lines.append(f"{s:<{width}}  {self.kinds[s]:<9} {counts}")
        line = self.duplicates_line()
        return "\n".join(lines + ([line] if line else []))

    # -- persistence -------------------------------------------------------------------------

    def save(self, directory: str) -> None:
        """Writes ``data.json`` (sources, target, kinds, answer format) and ``<split>.jsonl``."""
        os.makedirs(directory, exist_ok=True)
        meta = {"sources": self.sources, "target": self.target, "kinds": self.kinds,
                "answer_format": self.answer_format, "duplicates": self.duplicates}
        with open(os.path.join(directory, "data.json"), "w") as f:
            json.dump(meta, f, indent=1)
        for split in SPLITS:
            with open(os.path.join(directory, f"{split}.jsonl"), "w") as f:
                for e in self.examples(split):
                    f.write(json.dumps(e, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: str) -> "MultiSourceData":
        """Reads what :meth:`save` wrote."""
        path = os.path.join(directory, "data.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory}: no data.json; expected a MultiSourceData.save "
                                    "directory")
        with open(path) as f:
            meta = json.load(f)
        splits: dict[str, dict[str, list[dict]]] = {}
        for split in SPLITS:
            splits[split] = {}
            with open(os.path.join(directory, f"{split}.jsonl")) as f:
                for line in f:
                    if line.strip():
                        e = json.loads(line)
                        splits[split].setdefault(e["source"], []).append(e)
        return cls(splits, sources=meta["sources"], target=meta["target"], kinds=meta["kinds"],
                   answer_format=meta["answer_format"], duplicates=meta.get("duplicates"))

    def __repr__(self) -> str:
        sizes = {s: sum(self.n(s, name) for name in self.sources) for s in SPLITS}
        return (f"MultiSourceData({len(self.sources)} sources, target={self.target!r}, "
                f"train={sizes['train']}, validation={sizes['validation']}, test={sizes['test']})")


# ----------------------------------------------------------------------------------------------
# Loading files.


@dataclasses.dataclass(frozen=True)
class SourcesSpec:
    """Where the sources come from and how they are split.

    Attributes:
      format: row layout, one of :data:`FORMATS`.
      path: a local file or a list of files (same format and columns), or None with ``hub``.
      hub: a Hugging Face dataset name for ``datasets.load_dataset`` (needs network), or None.
      hub_config: the dataset configuration name for ``hub``, or None.
      hub_split: which split of the Hub dataset to read (it is then split per source here).
      file_type: one of :data:`FILE_TYPES`; None infers it from the file suffix (``.json``,
        ``.jsonl``, ``.csv``, ``.tsv``, ``.parquet``/``.pq``, ``.pkl``/``.pickle``). Text is kept
        as written (module docstring, **Text as written**).
      columns: role -> column name, overriding :data:`DEFAULT_COLUMNS` of the format (set
        ``source`` to None to name the source after ``source``/the file instead of a column;
        ``""`` keeps the format's default, so a config can list every role of
        :data:`COLUMN_ROLES`).
      source: a fixed source name for every row (overrides the source column).
      answer_format: for ``generic`` with an answer column, how answers are extracted from
        generations (:data:`ANSWER_FORMATS`; default "full"). ``cot`` always uses "cot".
      sources: keep only these sources, in this order; None keeps all, sorted.
      target: the target source, or None.
      validation: per source, a fraction in [0, 1) (rounded) or a whole count >= 1 of validation
        examples (:mod:`jaxgrad.common.counts`; counted in distinct (prompt, completion) pairs). The
        target needs at least one.
      test: the same for test examples; the target needs at least one unless this is 0.
      max_examples: at most this many distinct examples per source (seeded subset), or None.
      seed: split seed.
      allow_pickle: permit ``file_type="pickle"``; unpickling runs code from the file, so it is
        refused unless asked for.
      noisy: sources that get a label-noise copy ``noisy_<source>``
        (:meth:`MultiSourceData.with_label_noise`, seeded by ``seed``), appended after the others.
      kinds: source -> kind ("related", "unrelated", ...: the ground truth a ranking is checked
        against, :func:`jaxgrad.pipeline.ranking_auc`); the target is "target", noisy copies
        "noisy", unnamed sources "unknown". Also a list of ``(source, kind)`` pairs, for names an
        ml_collections config cannot hold as keys (``"v1.2"``: ConfigDict refuses dots in keys).
    """

    format: str = "generic"
    path: str | Sequence[str] | None = None
    hub: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    file_type: str | None = None
    columns: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
    source: str | None = None
    answer_format: str | None = None
    sources: Sequence[str] | None = None
    target: str | None = None
    validation: float | int = DEFAULT_VALIDATION
    test: float | int = DEFAULT_TEST
    max_examples: int | None = None
    seed: int = 0
    allow_pickle: bool = False
    noisy: Sequence[str] | None = None
    kinds: Mapping[str, str] | None = None


def _as_spec(spec: Any) -> SourcesSpec:
    if isinstance(spec, SourcesSpec):
        return spec
    if hasattr(spec, "to_dict") and not isinstance(spec, Mapping):  # ml_collections.ConfigDict
        spec = spec.to_dict()
    if not isinstance(spec, Mapping):
        raise TypeError(f"spec must be a SourcesSpec, a mapping or a ConfigDict, got "
                        f"{type(spec).__name__}")
    allowed = [f.name for f in dataclasses.fields(SourcesSpec)]
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise ValueError(f"spec has unknown keys {unknown}; allowed keys: {allowed}")
    spec = dict(spec)
    kinds = spec.get("kinds")
    if kinds is not None and not isinstance(kinds, Mapping):
        pairs = list(kinds)
        if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
            raise ValueError(f"data.files.kinds must map source -> kind, or be a list of "
                             f"(source, kind) pairs; got {kinds!r}")
        spec["kinds"] = {str(s): str(k) for s, k in pairs}
    return SourcesSpec(**spec)


def _file_type(path: str, file_type: str | None) -> str:
    if file_type is not None:
        if file_type not in FILE_TYPES:
            raise ValueError(f"file_type {file_type!r} is not supported; expected one of "
                             f"{', '.join(FILE_TYPES)}")
        return file_type
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _SUFFIXES:
        raise ValueError(f"{path}: cannot infer the file type from suffix {suffix!r}; pass "
                         f"file_type (one of {', '.join(FILE_TYPES)})")
    return _SUFFIXES[suffix]


class _Literal:
    """A parsed JSON number that remembers its literal: ``str`` gives the text as written."""

    def __new__(cls, literal: str):
        obj = super().__new__(cls, literal)
        obj.literal = literal
        return obj

    def __str__(self) -> str:
        return self.literal

    __repr__ = __str__


class _JsonInt(_Literal, int):
    """A JSON integer (compares as an int)."""


class _JsonFloat(_Literal, float):
    """A JSON number with a fraction or exponent, or NaN / Infinity (compares as a float)."""


def json_loads(text: str) -> Any:
    """``json.loads`` keeping every number's literal: numbers are int / float subclasses (they
    compare and add as numbers) whose ``str`` is the text as written (``2.50`` -> ``"2.50"``)."""
    return json.loads(text, parse_int=_JsonInt, parse_float=_JsonFloat,
                      parse_constant=_JsonFloat)


def _json_dump(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (_JsonInt, _JsonFloat)):
        return value.literal
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(str(k), ensure_ascii=False)}: {_json_dump(v)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_json_dump(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def json_text(value: Any) -> str | None:
    """The text of a value parsed by :func:`json_loads`, as the file wrote it: a string as is, a
    number's literal, ``true`` / ``false``, an array or object as JSON text; None for ``null``."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, _JsonInt, _JsonFloat, Mapping, list, tuple)):
        return _json_dump(value)
    return str(value)


def _typed_text(value: Any) -> str | None:
    """Text of a value of a typed column (parquet, pickle, Hub): ``str`` of it; None when blank
    (None, a float NaN, pandas' NA / NaT)."""
    if value is None or type(value).__name__ in ("NAType", "NaTType"):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (float, np.floating)) and math.isnan(value):
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def read_text(path: str) -> str:
    """The file's text as UTF-8 (a leading byte-order mark dropped).

    Raises:
      ValueError: bytes that are not UTF-8, naming the file, the line, the column and the byte.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{path}: line {line}, column {column} is not UTF-8 text (byte "
                         f"0x{data[e.start]:02x}: {e.reason}); save the file as UTF-8") from None


def _rows_table(rows: list[Mapping], label: str) -> dict[str, list]:
    """Columns (the union of the rows' keys, in order of appearance) of a list of objects."""
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise ValueError(f"{label}: record {i} is a JSON {type(r).__name__}; expected an "
                             "object (one row) per record")
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return {c: [r.get(c) for r in rows] for c in cols}


def _read_json(path: str, lines: bool) -> dict[str, list[str | None]]:
    """Columns of a JSON file (an array of objects, or an object of equally long column arrays)
    or a JSON Lines file (one object per line; a ``.json`` file holding JSON Lines is read as
    such), every value turned into its text by :func:`json_text`."""
    text = read_text(path)
    if not text.strip():
        raise ValueError(f"{path}: the file is empty; expected "
                         + ("one JSON object per line" if lines else "a JSON array of objects"))
    table = None
    if not lines:
        try:
            obj = json_loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":
                raise ValueError(f"{path}: not valid JSON ({e})") from e
            lines = True  # several JSON values: JSON Lines under a .json name
        else:
            if isinstance(obj, list):
                table = _rows_table(obj, path)
            elif (isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values())
                  and len({len(v) for v in obj.values()}) == 1):
                table = obj
            else:
                raise ValueError(f"{path}: holds a JSON {type(obj).__name__} that is neither an "
                                 "array of objects nor an object of equally long column arrays")
    if lines:
        rows = []
        for i, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                rows.append(json_loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {i} is not valid JSON ({e}); expected one JSON "
                                 "object per line") from e
            if not isinstance(rows[-1], dict):
                raise ValueError(f"{path}: line {i} holds a JSON {type(rows[-1]).__name__}; "
                                 "expected one object per line")
        table = _rows_table(rows, path)
    return {c: [json_text(v) for v in vs] for c, vs in table.items()}


def _read_delimited(path: str, delimiter: str) -> dict[str, list[str]]:
    """Columns of a CSV / TSV file with a header row, every cell a string as written (a blank cell
    is ``""``; blank lines are skipped; a short row's missing cells are blank).

    Quoting follows RFC 4180 (what pandas and spreadsheets write, tab-separated too), strictly: a
    quote left open to the end of the file, or text after a closing quote (``"Hi," she said``),
    is refused naming the file and line instead of swallowing the rows after it.
    """
    limit = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long texts in one cell
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter, strict=True)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path}: the file is empty; expected a header row and rows")
            repeated = sorted({h for h in header if header.count(h) > 1})
            if repeated:
                raise ValueError(f"{path}: the header names columns {repeated} more than once")
            rows = []
            for row in reader:
                if not row:
                    continue
                if len(row) > len(header):
                    raise ValueError(f"{path}: line {reader.line_num} has {len(row)} cells, the "
                                     f"header {len(header)}")
                rows.append(row + [""] * (len(header) - len(row)))
    except UnicodeDecodeError:
        read_text(path)  # raises naming the line, column and byte
        raise
    except csv.Error as e:
        where = f" at line {reader.line_num}" if "reader" in locals() else ""
        raise ValueError(f"{path}: not a valid {'TSV' if delimiter == chr(9) else 'CSV'} "
                         f"file{where} ({e}); a cell that starts with a quote must be quoted "
                         f"whole, with inner quotes doubled") from e
    finally:
        csv.field_size_limit(limit)
    return {h: [r[j] for r in rows] for j, h in enumerate(header)}


def _read_parquet(path: str) -> dict[str, list[str | None]]:
    import pyarrow.parquet as pq  # lazy: a dependency of datasets

    table = pq.read_table(path).to_pydict()
    return {c: [_typed_text(v) for v in vs] for c, vs in table.items()}


def _read_pickle(path: str) -> dict[str, list[str | None]]:
    import pandas as pd  # lazy: a dependency of datasets

    obj = pd.read_pickle(path)
    if isinstance(obj, pd.DataFrame):
        table = {c: obj[c].tolist() for c in obj.columns}
    elif hasattr(obj, "to_dict") and hasattr(obj, "column_names"):  # a pickled datasets.Dataset
        table = obj.to_dict()
    elif isinstance(obj, list) and all(isinstance(r, Mapping) for r in obj):
        cols = list(dict.fromkeys(k for r in obj for k in r))
        table = {c: [r.get(c) for r in obj] for c in cols}
    else:
        raise TypeError(f"{path}: pickle holds a {type(obj).__name__}; expected a pandas "
                        "DataFrame, a datasets.Dataset or a list of dicts")
    return {str(c): [_typed_text(v) for v in vs] for c, vs in table.items()}


def _read_columns(spec: SourcesSpec, path: str | None) -> tuple[dict[str, list], str]:
    """Column name -> text values (str, or None when blank) of one file (or the Hub dataset),
    and a label naming it. Local files are read here, not by ``datasets``, so that no type
    inference rewrites a value (module docstring, **Text as written**)."""
    if path is None:
        try:
            import datasets  # lazy: keep `import jaxgrad.data` light
        except ImportError as e:  # pragma: no cover - environment dependent
            raise ImportError("loading a Hub dataset needs the `datasets` package: pip install "
                              "datasets") from e
        label = f"hub dataset {spec.hub!r}"
        try:
            ds = datasets.load_dataset(spec.hub, spec.hub_config, split=spec.hub_split)
        except (ConnectionError, OSError) as e:
            raise ConnectionError(
                f"could not load {label} (config={spec.hub_config!r}, split={spec.hub_split!r}):"
                f" the Hugging Face Hub is unreachable or the dataset is not cached ({e}). "
                "Offline, download it elsewhere and pass a local file as `path`.") from e
        return {c: [_typed_text(v) for v in vs] for c, vs in ds.to_dict().items()}, label
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    file_type = _file_type(path, spec.file_type)
    if file_type == "pickle":
        if not spec.allow_pickle:
            raise ValueError(f"{path}: refusing to load a pickle file: unpickling runs arbitrary "
                             "code from the file. Convert it to parquet or JSON Lines, or pass "
                             "allow_pickle=True if you trust its origin.")
        return _read_pickle(path), path
    if file_type in ("json", "jsonl"):
        return _read_json(path, lines=file_type == "jsonl"), path
    if file_type in ("csv", "tsv"):
        return _read_delimited(path, "," if file_type == "csv" else "\t"), path
    return _read_parquet(path), path


def _column(table: dict[str, list], name: str, role: str, label: str) -> list:
    if name not in table:
        raise ValueError(f"{label}: missing column {name!r} (the {role} column); the file has "
                         f"columns {sorted(table)}")
    return table[name]


def _text(value: str | None) -> str:
    """A text field: the value read, ``""`` when blank."""
    return "" if value is None else value


def _answer(value: str | None) -> str | None:
    """An answer: the value read, None when blank (empty or whitespace only)."""
    return value if value is not None and value.strip() else None


def read_examples(spec: Any) -> list[dict]:
    """Reads the rows of ``spec`` (a :class:`SourcesSpec` or mapping) as examples, unsplit.

    Use it to combine files of different formats: concatenate the lists and call
    :meth:`MultiSourceData.from_examples`. Every text field is the text of the file, never a
    type-inferred rewrite of it (module docstring, **Text as written**): JSON numbers keep their
    literal, CSV / TSV cells are strings, blank values are ``""`` (text) or None (answers).

    Raises ValueError naming the missing column, the file and the columns it has; ValueError
    listing the supported formats for an unknown format.
    """
    spec = _as_spec(spec)
    if spec.format not in FORMATS:
        raise ValueError(f"format {spec.format!r} is not supported; expected one of "
                         f"{', '.join(FORMATS)}")
    if spec.format == "bigbench":
        return _read_bigbench(spec)
    if (spec.path is None) == (spec.hub is None):
        raise ValueError("spec needs exactly one of path (local files) and hub (a dataset name), "
                         f"got path={spec.path!r}, hub={spec.hub!r}")
    roles = DEFAULT_COLUMNS[spec.format]
    columns = _given_columns(spec)
    unknown = sorted(set(columns) - set(roles))
    if unknown:
        raise ValueError(f"columns has unknown roles {unknown} for format {spec.format!r}; its "
                         f"roles are {sorted(roles)}")
    cols = dict(roles, **columns)
    paths: list[str | None]
    if spec.path is None:
        paths = [None]
    elif isinstance(spec.path, (str, os.PathLike)):
        paths = split_paths(os.fspath(spec.path))
    else:
        paths = [os.fspath(p) for p in spec.path]
    missing = [p for p in paths if p is not None and not os.path.isfile(p)]
    if missing:  # all of them at once, not the first one per attempt
        raise FileNotFoundError(f"data file{'s' if len(missing) > 1 else ''} "
                                f"{', '.join(missing)} {'do' if len(missing) > 1 else 'does'} "
                                f"not exist ({len(missing)} of the {len(paths)} in data.files.path)")
    rows: list[tuple[str, str, str, str | None]] = []
    for path in paths:
        table, label = _read_columns(spec, path)
        n = len(next(iter(table.values()))) if table else 0
        if n == 0:
            raise ValueError(f"{label}: holds no rows (columns: {sorted(table) or 'none'}); "
                             "expected at least one example")
        if spec.source is not None:
            names = [spec.source] * n
        elif cols["source"] is not None:
            names = [_text(v) for v in _column(table, cols["source"], "source", label)]
            blank = [i + 1 for i, v in enumerate(names) if not v.strip()]
            if blank:
                raise ValueError(f"{label}: row{'s' if len(blank) > 1 else ''} "
                                 f"{', '.join(map(str, blank[:10]))}{' ...' if len(blank) > 10 else ''}"
                                 f" of {n} {'have' if len(blank) > 1 else 'has'} an empty source "
                                 f"(column {cols['source']!r}); give every row a source name, or "
                                 "set `source` to name them all")
        else:
            stem = spec.hub if path is None else os.path.splitext(os.path.basename(path))[0]
            names = [stem] * n
        rows.extend(_format_rows(spec, cols, table, label, names))
    return make_examples(rows)


def _given_columns(spec: SourcesSpec) -> dict[str, str | None]:
    """The roles ``spec.columns`` sets (``""``: the format's default column, so left out)."""
    return {k: v for k, v in (spec.columns or {}).items() if v != ""}


def split_paths(path: str) -> list[str]:
    """One path, or several given as a comma-separated list (``a.jsonl,b.jsonl``, as typed on a
    command line); a name that exists as a file is never split, whatever it contains."""
    if "," not in path or os.path.exists(path):
        return [path]
    return [p.strip() for p in path.split(",") if p.strip()]


def _read_bigbench(spec: SourcesSpec) -> list[dict]:
    from jaxgrad.data import bigbench

    if spec.path is None or spec.hub is not None:
        raise ValueError("format 'bigbench' reads local task files: set path (a task directory, "
                         "a task.json, a directory of tasks, or a list); hub is not supported")
    for field, value in (("columns", _given_columns(spec)), ("source", spec.source),
                         ("file_type", spec.file_type)):
        if value:
            raise ValueError(f"format 'bigbench' takes no {field} (got {value!r}): sources are "
                             "named after the task directories")
    rows, _ = bigbench.read_tasks(spec.path, tasks=None if spec.sources is None
                                  else [s for s in spec.sources])
    return make_examples((src, p, c, extract_leading_answer(a)) for src, p, c, a in rows)


def _format_rows(spec: SourcesSpec, cols: Mapping[str, str | None], table: dict[str, list],
                 label: str, names: list[str]) -> list[tuple[str, str, str, str | None]]:
    get = lambda role: [_text(v) for v in _column(table, cols[role], role, label)]  # noqa: E731
    if spec.format == "generic":
        prompts, completions = get("prompt"), get("completion")
        answers = ([_answer(v) for v in _column(table, cols["answer"], "answer", label)]
                   if cols["answer"] is not None else [None] * len(prompts))
        return list(zip(names, prompts, completions, answers))
    if spec.format == "alpaca":
        instructions, inputs, outputs = get("instruction"), get("input"), get("output")
        prompts = [(ALPACA_PROMPT_WITH_INPUT.format(instruction=ins, input=inp) if inp.strip()
                    else ALPACA_PROMPT_NO_INPUT.format(instruction=ins))
                   for ins, inp in zip(instructions, inputs)]
        return [(s, p, o, None) for s, p, o in zip(names, prompts, outputs)]
    if spec.format == "flan":
        inputs, targets = get("inputs"), get("targets")
        prompts = [x if x.endswith("\n") or x.rstrip().endswith(":") else x + "\n" for x in inputs]
        return [(s, p, t, None) for s, p, t in zip(names, prompts, targets)]
    questions, rationales, answers = get("question"), get("rationale"), get("answer")
    return [(s, COT_PROMPT.format(question=q.strip()),
             COT_COMPLETION.format(rationale=r.strip(), answer=a.strip()), _answer(a.strip()))
            for s, q, r, a in zip(names, questions, rationales, answers)]


def load_sources(spec: Any) -> MultiSourceData:
    """Reads and splits the sources described by ``spec``.

    Args:
      spec: a :class:`SourcesSpec`, a mapping with its field names, or an ml_collections
        ConfigDict with them. Unknown keys are errors.

    Returns:
      The per-source train / validation / test splits, drawn and checked by
      :meth:`MultiSourceData.from_examples` (messages name the settings ``data.files.validation``
      / ``data.files.test`` / ``data.files.max_examples``, the fields of this spec): copies of a
      (prompt, completion) pair share a split, the target's held-out pairs are removed from the
      other sources (counted in ``.duplicates``), every source has a train example and the target
      a validation example (and a test example unless ``test`` is 0).

    Example::

      data = load_sources({"format": "alpaca", "path": "alpaca.jsonl", "target": "coding",
                           "validation": 50, "test": 50})
      data.examples("train", sources=["coding", "math"])
    """
    spec = _as_spec(spec)
    for field in ("sources", "noisy"):
        if isinstance(getattr(spec, field), str):
            raise TypeError(f"{field} must be a list of source names, got the string "
                            f"{getattr(spec, field)!r} (write [{getattr(spec, field)!r}])")
    if spec.kinds and spec.target in spec.kinds and spec.kinds[spec.target] != "target":
        raise ValueError(f"kinds gives the target {spec.target!r} the kind "
                         f"{spec.kinds[spec.target]!r}; the target's kind is always 'target'")
    examples = read_examples(spec)
    if spec.format == "cot":
        answer_format = "cot"
    elif spec.format == "bigbench":
        answer_format = spec.answer_format or "leading"
    elif spec.format == "generic" and dict(DEFAULT_COLUMNS["generic"],
                                           **_given_columns(spec))["answer"] is not None:
        answer_format = spec.answer_format or "full"
    else:
        answer_format = spec.answer_format
    kinds = dict(spec.kinds or {})
    noisy = list(spec.noisy or ())
    data = MultiSourceData.from_examples(
        examples, validation=spec.validation, test=spec.test, seed=spec.seed,
        sources=spec.sources, target=spec.target, max_examples=spec.max_examples,
        answer_format=answer_format, setting_prefix="data.files.",
        kinds={k: v for k, v in kinds.items() if k not in {f"noisy_{n}" for n in noisy}} or None)
    return data.with_label_noise(noisy, seed=spec.seed) if noisy else data
