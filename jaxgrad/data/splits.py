"""How :meth:`~jaxgrad.data.multisource.MultiSourceData.from_examples` splits one source: its
distinct (prompt, completion) pairs drawn with the source's seed (:func:`draw_pairs`), and the
split sizes asked checked against them (:class:`SplitSettings`), every refusal naming the source,
the split and the setting to change."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

from jaxgrad.common.counts import check_fraction_or_count, fraction_or_count
from jaxgrad.data.examples import _unique_ids


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def group_by_source(examples: Iterable[dict], sources: Sequence[str] | None) -> dict[str, list[dict]]:
    """``examples`` (repeated ids renumbered) by source: in ``sources`` order when given (each
    must have examples), else in order of first appearance."""
    by_source: dict[str, list[dict]] = {}
    for e in _unique_ids(list(examples)):
        by_source.setdefault(e["source"], []).append(e)
    if sources is not None:
        missing = [s for s in sources if s not in by_source]
        if missing:
            raise ValueError(f"sources {missing} have no examples; available: "
                             f"{sorted(by_source)}")
        by_source = {s: by_source[s] for s in sources}
    return by_source


class Pairs(NamedTuple):
    """A source's distinct (prompt, completion) pairs, drawn for splitting."""

    groups: dict[tuple[str, str], list[int]]  # pair -> the rows holding it
    keys: list[tuple[str, str]]  # the pairs, in order of first row
    order: np.ndarray  # indices into keys: the pairs kept, permuted
    repeated: int  # rows that repeat a pair of the source
    removed: int  # rows dropped because the target holds their pair out
    capped: bool  # max_examples cut the pairs


def draw_pairs(exs: list[dict], seed: list[int], held_out: set[tuple[str, str]],
                max_examples: int | None) -> Pairs:
    """Permute the distinct pairs of ``exs`` with ``seed``, drop those in ``held_out``, keep at
    most ``max_examples``."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, e in enumerate(exs):
        groups.setdefault((e["prompt"], e["completion"]), []).append(i)
    keys = list(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    removed = 0
    if held_out:
        drop = np.array([keys[g] in held_out for g in range(len(keys))], bool)
        if drop.any():
            removed = sum(len(groups[keys[g]]) for g in np.flatnonzero(drop))
            order = order[~drop[order]]
    capped = max_examples is not None and len(order) > max_examples
    order = order[:max_examples] if capped else order
    return Pairs(groups, keys, order, len(exs) - len(keys), removed, capped)


@dataclasses.dataclass(frozen=True)
class SplitSettings:
    """The split sizes asked of :meth:`MultiSourceData.from_examples`, checked, and how its
    messages name them (``prefix``: the config section, ``data.files.``, or nothing)."""

    validation: Any
    test: Any
    max_examples: int | None
    prefix: str
    val_rule: float | int
    test_rule: float | int

    @classmethod
    def check(cls, validation: Any, test: Any, max_examples: Any, prefix: str) -> "SplitSettings":
        val_rule = check_fraction_or_count(validation, name=f"{prefix}validation", allow_zero=True)
        test_rule = check_fraction_or_count(test, name=f"{prefix}test", allow_zero=True)
        if max_examples is not None and (isinstance(max_examples, bool)
                                         or not isinstance(max_examples, int) or max_examples < 1):
            raise ValueError(f"{prefix}max_examples must be a positive int or None, got "
                             f"{max_examples!r}")
        return cls(validation, test, max_examples, prefix, val_rule, test_rule)

    @property
    def val_name(self) -> str:
        return f"{self.prefix}validation"

    @property
    def test_name(self) -> str:
        return f"{self.prefix}test"

    def sizes(self, n: int) -> tuple[int, int]:
        """Validation and test examples of a source of ``n`` (a count larger than ``n`` is
        returned as is: :meth:`problem` refuses it, naming the source)."""
        def size(value: Any, rule: float | int, setting: str) -> int:
            if isinstance(rule, int) and rule > n:
                return rule
            return fraction_or_count(value, n, name=setting, allow_zero=True)

        return (size(self.validation, self.val_rule, self.val_name),
                size(self.test, self.test_rule, self.test_name))

    def problem(self, name: str, is_target: bool, n_rows: int, pairs: Pairs, n_val: int,
                n_test: int) -> str | None:
        """Why the source ``name`` cannot be split so, naming the settings to change; None if
        it can."""
        def gives(setting: str, value: Any, rule: float | int, k: int, split: str) -> str:
            verb = "asks for" if isinstance(rule, int) else "gives"
            return f"{setting}={value!r} {verb} {plural(k, split + ' example')}"

        n = len(pairs.order)
        val_name, test_name, test_rule = self.val_name, self.test_name, self.test_rule
        notes = []
        if pairs.repeated:
            notes.append(f"{n_rows} rows; splits count distinct (prompt, completion) pairs")
        if pairs.removed:
            notes.append(f"after removing {plural(pairs.removed, 'row')} whose pair is in the "
                         f"target's validation/test split")
        if pairs.capped:
            notes.append(f"{self.prefix}max_examples={self.max_examples}")
        desc = (f"{'target source' if is_target else 'source'} {name!r} has "
                f"{plural(n, 'example')}" + (f" ({'; '.join(notes)})" if notes else ""))
        val_part = gives(val_name, self.validation, self.val_rule, n_val, "validation")
        test_part = gives(test_name, self.test, test_rule, n_test, "test")
        # Examples the target needs: its validation and (when asked) test split, one train.
        need = max(n_val, 1) + (max(n_test, 1) if test_rule else 0) + 1
        if n_val + n_test >= n:
            return (f"{desc}: {val_part} and {test_part}, leaving {max(n - n_val - n_test, 0)} "
                    f"train examples (every source needs at least 1 train example); lower "
                    f"{val_name} / {test_name}"
                    + (f", or give the target at least {need} examples" if is_target else "")
                    + ("" if is_target else f" (or leave the source out of "
                                            f"{self.prefix}sources)"))
        if is_target and n_val == 0:
            return (f"{desc}: {val_part}, and the selection scores sources by the loss on the "
                    f"target's validation split; set {val_name} to a count >= 1"
                    + (f", and give the target at least {need} examples (validation"
                       f"{', test' if test_rule else ''} and 1 train)" if n < need else ""))
        if is_target and test_rule and n_test == 0:
            return (f"{desc}: {test_part}, and the final report evaluates the target's test "
                    f"split; set {test_name} to a count >= 1 (or to 0 for no test split)"
                    + (f", and give the target at least {need} examples (validation, test "
                       f"and 1 train)" if n < need else ""))
        return None
