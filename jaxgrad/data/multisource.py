"""The multi-source dataset: every source's train / validation / test split.

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

Ground truth for checking a ranking: ``kinds`` labels sources (``related``, ``unrelated``, ...),
and ``noisy`` plants label-noise copies ``noisy_<source>`` of chosen sources (their prompts with
the completions of other examples of the same source and split: see
:meth:`MultiSourceData.with_label_noise`).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Iterable, Mapping, Sequence

import numpy as np

from jaxgrad.config import DEFAULT_TEST, DEFAULT_VALIDATION
from jaxgrad.data.examples import ANSWER_FORMATS, SPLITS, make_examples, seed_for
from jaxgrad.data.splits import SplitSettings, plural, draw_pairs, group_by_source

log = logging.getLogger(__name__)

_WARNED: set[str] = set()


def _warn_once(line: str) -> None:
    """Log ``line`` once per process: every pipeline stage loads the same data again."""
    if line and line not in _WARNED:
        _WARNED.add(line)
        log.warning("%s", line)


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
          examples: example dicts (:mod:`jaxgrad.data.examples`), any source order. A repeated
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
        settings = SplitSettings.check(validation, test, max_examples, setting_prefix)
        by_source = group_by_source(examples, sources)
        splits: dict[str, dict[str, list[dict]]] = {s: {} for s in SPLITS}
        repeated: dict[str, int] = {}
        removed: dict[str, int] = {}
        problems: list[str] = []
        held_out: set[tuple[str, str]] = set()
        names = [target] if target in by_source else []
        names += [name for name in by_source if name != target]
        for name in names:
            exs, is_target = by_source[name], name == target
            pairs = draw_pairs(exs, seed_for(seed, name), set() if is_target else held_out,
                                max_examples)
            if pairs.repeated:
                repeated[name] = pairs.repeated
            if pairs.removed:
                removed[name] = pairs.removed
            n_val, n_test = settings.sizes(len(pairs.order))
            problem = settings.problem(name, is_target, len(exs), pairs, n_val, n_test)
            if problem is not None:
                problems.append(problem)
                continue
            order = pairs.order
            parts = {"validation": order[:n_val], "test": order[n_val:n_val + n_test],
                     "train": order[n_val + n_test:]}
            for split, idx in parts.items():
                rows = sorted(i for g in idx for i in pairs.groups[pairs.keys[g]])
                splits[split][name] = [exs[i] for i in rows]
            if is_target:
                held_out = {pairs.keys[g] for split in ("validation", "test") for g in parts[split]}
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

    def target_examples(self, split: str = "validation") -> list[dict]:
        """The target's examples of one split: ``validation`` is what the selection scores and
        the estimates predict, ``test`` what the final report measures."""
        return self.examples(split, [self.target])

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
            parts.append(f"{plural(sum(rep.values()), 'row')} repeat a (prompt, completion) pair "
                         f"of their source, kept in the same split as its first copy "
                         f"({detail(rep)})")
        if rem:
            parts.append(f"{plural(sum(rem.values()), 'row')} removed from other sources because "
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
