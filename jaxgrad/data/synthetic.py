"""The embedded default sources: small character-level sequence tasks generated from a seed.

Nothing is downloaded. Each task draws its prompts from a seeded generator and writes the
completion, with the final answer after ``#`` where the task has intermediate steps::

    add        "345+678="   -> "5+8=13,4+7+1=12,3+6+1=10#1023"   column sums with carries written
    sub        "745-278="   -> "15-8=7,14-7-1=6,7-2-1=4#467"     borrows written (10+digit, -1)
    successor  "199+1="     -> "9+1=10,9+0+1=10,1+0+1=2#200"     add's format with 1 (close to add)
    add_digit  "47+8="      -> "7+8=15,4+0+1=5#55"               add's format, a one-digit 1..9 second
    parity     "par 1011>"  -> "1101#1"                          running parity, then the parity
    copy       "copy kxq>"  -> "kxq"
    reverse    "rev kxq>"   -> "qxk"
    sort       "sort kxq>"  -> "kqx"

Besides the tasks (kind ``"related"``, and ``"target"`` for the one chosen as target) a spec adds

* ``noisy_<task>`` sources (kind ``"noisy"``): the task's prompts with the completion of another,
  independently drawn problem of the same task whose answer differs: label noise;
* ``unrelated_<i>`` sources (kind ``"unrelated"``): random lowercase/digit strings ending in ``?``
  mapped to random uppercase strings, with no relation between the two.

GradEx should rank noisy and unrelated sources last; :func:`source_kinds` records the kinds so the
demo can check that. Answers are extracted with ``answer_format="marker"`` (text after the last
``#``, or the whole completion).

Sizes: at the defaults (3 digits, 8 characters) prompt + completion is at most 39 characters, 41
tokens with bos and eos, so ``max_length=48`` never truncates; each source has 200 / 50 / 50
train / validation / test examples. Prompts are unique within a source (no example is in two
splits of one source), and the target's validation and test prompts appear in no other source.
Every source draws from its own generator seeded by (seed, source name): adding a source leaves
the others unchanged.

:func:`generic_text` gives structured random text that is none of the tasks (no ``+ - = # > ?``,
no task keywords), for pretraining a tiny base model from scratch before fine-tuning on the tasks.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Callable

import numpy as np

from jaxgrad.common.checks import as_names
from jaxgrad.data.examples import SPLITS, make_examples, seed_for
from jaxgrad.data.multisource import MultiSourceData

TASKS = ("add", "sub", "successor", "add_digit", "parity", "copy", "reverse", "sort")
KINDS = ("target", "related", "noisy", "unrelated")
# Characters that mark task formats; generic_text never emits them.
TASK_SYMBOLS = "+-=#>?"
TASK_KEYWORDS = ("copy ", "rev ", "sort ", "par ")

_Problem = tuple[str, str, str]  # prompt, completion, answer


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """Which synthetic sources to build, and how large.

    Attributes:
      tasks: task sources, in the order they appear in ``sources`` (see :data:`TASKS`).
      target: the target task (must be in ``tasks``) or None.
      noisy: tasks that get a label-noise copy ``noisy_<task>`` (need not be in ``tasks``).
      unrelated: number of unrelated random-string sources ``unrelated_<i>``.
      n_train: train examples per source.
      n_validation: validation examples per source.
      n_test: test examples per source.
      max_digits: operands of add / sub / successor have 1..max_digits digits.
      max_chars: strings of copy / reverse / sort / parity / unrelated have 1..max_chars characters.
      seed: generator seed.
    """

    tasks: tuple[str, ...] = ("add", "sub", "successor", "copy", "reverse", "sort")
    target: str | None = "add"
    noisy: tuple[str, ...] = ("add", "sort")
    unrelated: int = 2
    n_train: int = 200
    n_validation: int = 50
    n_test: int = 50
    max_digits: int = 3
    max_chars: int = 8
    seed: int = 0

    def __post_init__(self):
        for name in ("tasks", "noisy"):
            # "add,sub" or ("add,sub",) (--config.data.synthetic.tasks=add,sub) -> ("add", "sub")
            value = as_names(getattr(self, name))
            unknown = [t for t in value if t not in TASKS]
            if unknown:
                raise ValueError(f"data.synthetic.{name} has unknown tasks {unknown}; expected "
                                 f"names from {TASKS}")
            if len(set(value)) != len(value):
                raise ValueError(f"data.synthetic.{name} repeats a task: {tuple(value)}")
            object.__setattr__(self, name, tuple(value))
        if self.target is not None and self.target not in self.tasks:
            raise ValueError(f"data.synthetic.target {self.target!r} must be one of "
                             f"data.synthetic.tasks {self.tasks} or None")
        for name in ("unrelated", "n_validation", "n_test"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        for name in ("n_train", "max_digits", "max_chars"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")


# ----------------------------------------------------------------------------------------------
# Task generators: rng -> (prompt, completion, answer).


def _number(rng: np.random.Generator, max_digits: int) -> int:
    digits = int(rng.integers(1, max_digits + 1))
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return int(rng.integers(low, 10 ** digits))


def _letters(rng: np.random.Generator, max_chars: int, alphabet: str) -> str:
    n = int(rng.integers(1, max_chars + 1))
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), n))


def _columns(a: int, b: int):
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        yield (int(da[i]) if i < len(da) else 0), (int(db[i]) if i < len(db) else 0)


def addition(a: int, b: int) -> _Problem:
    """``a+b=`` with one step per column, least significant first: ``x+y[+1]=column sum``."""
    steps, carry = [], 0
    for x, y in _columns(a, b):
        total = x + y + carry
        steps.append(f"{x}+{y}{'+1' if carry else ''}={total}")
        carry = total // 10
    answer = str(a + b)
    return f"{a}+{b}=", ",".join(steps) + "#" + answer, answer


def subtraction(a: int, b: int) -> _Problem:
    """``a-b=`` (a >= b), one step per column: ``[1]x-y[-1]=digit`` (borrow taken, borrow paid)."""
    if a < b:
        raise ValueError(f"subtraction needs a >= b, got a={a}, b={b}")
    steps, borrow = [], 0
    for x, y in _columns(a, b):
        take = x - borrow < y
        top = x + 10 * take
        steps.append(f"{top}-{y}{'-1' if borrow else ''}={top - y - borrow}")
        borrow = int(take)
    answer = str(a - b)
    return f"{a}-{b}=", ",".join(steps) + "#" + answer, answer


def _add(rng, spec):
    return addition(_number(rng, spec.max_digits), _number(rng, spec.max_digits))


def _sub(rng, spec):
    a, b = _number(rng, spec.max_digits), _number(rng, spec.max_digits)
    return subtraction(max(a, b), min(a, b))


def _successor(rng, spec):
    return addition(_number(rng, spec.max_digits), 1)


def _add_digit(rng, spec):
    return addition(_number(rng, spec.max_digits), int(rng.integers(1, 10)))


def _parity(rng, spec):
    bits = _letters(rng, spec.max_chars, "01")
    running = np.cumsum([int(c) for c in bits]) % 2
    steps = "".join(str(int(p)) for p in running)
    return f"par {bits}>", f"{steps}#{steps[-1]}", steps[-1]


def _string_task(keyword: str, fn: Callable[[str], str]):
    def gen(rng, spec):
        s = _letters(rng, spec.max_chars, string.ascii_lowercase)
        out = fn(s)
        return f"{keyword} {s}>", out, out
    return gen


def _unrelated(rng, spec):
    prompt = _letters(rng, spec.max_chars, string.ascii_lowercase + string.digits) + "?"
    out = _letters(rng, spec.max_chars, string.ascii_uppercase)
    return prompt, out, out


GENERATORS: dict[str, Callable[[np.random.Generator, SyntheticSpec], _Problem]] = {
    "add": _add,
    "sub": _sub,
    "successor": _successor,
    "add_digit": _add_digit,
    "parity": _parity,
    "copy": _string_task("copy", lambda s: s),
    "reverse": _string_task("rev", lambda s: s[::-1]),
    "sort": _string_task("sort", lambda s: "".join(sorted(s))),
}


def _noisy(task: str):
    gen = GENERATORS[task]

    def noisy_gen(rng, spec):
        prompt, _, answer = gen(rng, spec)
        for _ in range(1000):
            _, completion, other = gen(rng, spec)
            if other != answer:
                return prompt, completion, other
        raise ValueError(f"noisy_{task}: could not draw a wrong answer for {prompt!r}; widen "
                         "max_digits / max_chars")
    return noisy_gen


# ----------------------------------------------------------------------------------------------
# Sources.


def source_kinds(spec: SyntheticSpec | None = None) -> dict[str, str]:
    """Source name -> kind, in source order: tasks, ``noisy_<task>``, ``unrelated_<i>``.

    Args:
      spec: the synthetic data spec (default :class:`SyntheticSpec`).

    Returns:
      ``{name: kind}``, kind one of ``"target"``, ``"related"``, ``"noisy"``, ``"unrelated"``.
    """
    spec = spec or SyntheticSpec()
    kinds = {t: ("target" if t == spec.target else "related") for t in spec.tasks}
    kinds.update({f"noisy_{t}": "noisy" for t in spec.noisy})
    kinds.update({f"unrelated_{i}": "unrelated" for i in range(spec.unrelated)})
    return kinds


def _generator(name: str):
    if name.startswith("noisy_"):
        return _noisy(name[len("noisy_"):])
    if name.startswith("unrelated_"):
        return _unrelated
    return GENERATORS[name]


def _draw(name: str, n: int, spec: SyntheticSpec, reserved: set[str]) -> list[_Problem]:
    gen = _generator(name)
    rng = np.random.default_rng(seed_for(spec.seed, name))
    out, seen, tries = [], set(reserved), 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(f"source {name!r}: could not draw {n} distinct prompts (got "
                             f"{len(out)}); lower n_train/n_validation/n_test or raise "
                             f"max_digits={spec.max_digits} / max_chars={spec.max_chars}")
        problem = gen(rng, spec)
        if problem[0] not in seen:
            seen.add(problem[0])
            out.append(problem)
    return out


def synthetic_sources(spec: SyntheticSpec | None = None) -> MultiSourceData:
    """Builds the synthetic sources of ``spec`` (defaults: :class:`SyntheticSpec`).

    Args:
      spec: tasks, target, noisy and unrelated sources, split sizes, seed, digit/char limits.

    Raises:
      ValueError: a source cannot draw enough distinct prompts under the spec's limits.

    Returns:
      MultiSourceData with ``sources`` in :func:`source_kinds` order, ``target=spec.target``,
      ``kinds`` filled and ``answer_format="marker"``. The same spec gives the same examples.
    """
    spec = spec or SyntheticSpec()
    kinds = source_kinds(spec)
    sizes = {"train": spec.n_train, "validation": spec.n_validation, "test": spec.n_test}
    total = sum(sizes.values())
    order = sorted(kinds, key=lambda s: s != spec.target)  # the target first: it reserves prompts
    reserved: set[str] = set()
    splits: dict[str, dict[str, list[dict]]] = {s: {} for s in SPLITS}
    for name in order:
        problems = _draw(name, total, spec, reserved)
        start = 0
        for split in SPLITS:
            part = problems[start:start + sizes[split]]
            start += sizes[split]
            splits[split][name] = make_examples((name, p, c, a) for p, c, a in part)
            if name == spec.target and split != "train":
                reserved |= {p for p, _, _ in part}
    return MultiSourceData(splits, sources=list(kinds), target=spec.target, kinds=kinds,
                           answer_format="marker")


# ----------------------------------------------------------------------------------------------
# Generic pretraining text.

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _word(rng: np.random.Generator) -> str:
    syllables = int(rng.integers(1, 4))
    return "".join(_CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(5)]
                   for _ in range(syllables))


def _words(rng):
    words = [_word(rng) for _ in range(int(rng.integers(2, 7)))]
    if rng.random() < 0.5:
        words[0] = words[0].capitalize()
    return " ".join(words) + str(rng.choice([".", "", ",", ";", "!"]))


def _digit_groups(rng):
    return " ".join(_letters(rng, 4, string.digits) for _ in range(int(rng.integers(2, 7))))


def _pairs(rng):
    return " ".join(string.ascii_lowercase[rng.integers(26)] + str(rng.integers(10))
                    for _ in range(int(rng.integers(2, 9))))


def _repeats(rng):
    unit = _letters(rng, 3, string.ascii_letters + string.digits)
    return " ".join([unit] * int(rng.integers(2, 7)))


def _mixed(rng):
    alphabet = string.ascii_letters + string.digits + " .,;:!()'\"/*%&@_"
    return _letters(rng, 30, alphabet)


_TEXT_STYLES = (_words, _digit_groups, _pairs, _repeats, _mixed)


def generic_text(n: int, seed: int = 0, *, max_chars: int = 40) -> list[str]:
    """``n`` lines of structured random text that belong to none of the synthetic tasks.

    Mixes pseudo-words (consonant-vowel syllables), digit groups, letter-digit pairs, repeated
    units and random printable strings, each at most ``max_chars`` characters and non-empty. No
    line contains :data:`TASK_SYMBOLS` or starts with a task keyword. For causal-LM pretraining
    use each line as a completion with an empty prompt, e.g.
    ``make_examples(("generic", "", t, None) for t in generic_text(1000))``.

    Args:
      n: lines wanted (an int >= 0); seed: the seed (``numpy.random.default_rng``).
      max_chars: the longest line in characters (an int >= 1).

    Returns:
      ``n`` non-empty strs, reproducible for a given seed.

    Raises:
      ValueError: ``n`` or ``max_chars`` not an int in range.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if not isinstance(max_chars, int) or max_chars < 1:
        raise ValueError(f"max_chars must be an int >= 1, got {max_chars!r}")
    rng = np.random.default_rng(seed_for(seed, "generic_text"))
    out: list[str] = []
    while len(out) < n:
        line = _TEXT_STYLES[rng.integers(len(_TEXT_STYLES))](rng)[:max_chars].strip()
        if line and not line.startswith(TASK_KEYWORDS):
            out.append(line)
    return out
