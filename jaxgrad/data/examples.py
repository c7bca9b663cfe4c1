"""One example of a source and its answer.

GradEx asks which of n training *sources* help a *target* task, so every example carries the name
of its source. An example is a plain dict (JSON-serialisable, what every later stage reads)::

    {"example_id": "add/3f2a9c0d1b7e", "source": "add", "prompt": "12+9=",
     "completion": "2+9=11,1+0+1=2#21", "answer": "21"}

``example_id`` is ``<source>/<12 hex digits of sha1(prompt, completion)>``, with ``~1``, ``~2``...
appended to repeated (prompt, completion) pairs of one source in file order: the same in every run
and independent of row order. Ids are unique across a
:class:`~jaxgrad.data.multisource.MultiSourceData` (every split, every source):
:meth:`~jaxgrad.data.multisource.MultiSourceData.from_examples` renumbers a repeated id (examples of one source read
by two ``read_examples`` calls) the same way, and the constructor refuses repeats. ``answer`` is
the final answer where the source defines one (None otherwise, and None for a blank answer: the
example is then not scored for accuracy); accuracy is the exact match of
:meth:`~jaxgrad.data.multisource.MultiSourceData.extract_answer` applied to a generated completion against it.

A source's rows become examples through :func:`make_examples`; the answer formats
(:data:`ANSWER_FORMATS`) read a generated completion's final answer back.
"""

from __future__ import annotations

import hashlib
import re
from typing import Callable, Iterable

SPLITS = ("train", "validation", "test")

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
    """Stable id of an example: the source and a content hash (no running counter, no salt).

    Args:
      source, prompt, completion: the example's fields (str).

    Returns:
      ``"<source>/<first 12 hex digits of sha1(prompt NUL completion)>"``.
    """
    digest = hashlib.sha1(f"{prompt}\x00{completion}".encode("utf-8")).hexdigest()[:12]
    return f"{source}/{digest}"


def make_examples(rows: Iterable[tuple[str, str, str, str | None]]) -> list[dict]:
    """Examples from ``(source, prompt, completion, answer)`` tuples, with stable ids.

    Repeated (source, prompt, completion) triples get ``~1``, ``~2``... appended to the id in the
    order given, so ids stay unique. An answer that is not a str is made one with ``str``; an
    empty or whitespace-only answer becomes None (no answer: not scored).

    Args:
      rows: ``(source, prompt, completion, answer)`` tuples; the first three str, ``answer``
        anything or None.

    Returns:
      One dict per row: ``example_id``, ``source``, ``prompt``, ``completion``, ``answer``.

    Raises:
      TypeError: source, prompt or completion not a str. ValueError: an empty source.
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
    """The text after the last ``#`` (the whole text when there is none), stripped.

    Args:
      text: a completion or generation.

    Returns:
      The answer string (possibly empty).
    """
    return text.rsplit(ANSWER_MARKER, 1)[-1].strip()


_COT_ANSWER = re.compile(r"answer is\s*(.*?)\s*\.?\s*$", re.DOTALL)


def extract_cot_answer(text: str) -> str | None:
    """The answer of a ``... Therefore, the answer is X.`` completion (None when absent).

    Only the first line after the last "answer is" counts, so generations that run on are cut.

    Args:
      text: a completion or generation.

    Returns:
      X stripped (a final "." removed), or None without "answer is".
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

    Args:
      text: a completion or generation.

    Returns:
      The leading answer string (possibly empty).
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


def seed_for(seed: int, name: str) -> list[int]:
    """A numpy seed sequence for ``name`` under ``seed``: stable across runs and processes."""
    return [int(seed), int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "little")]


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
