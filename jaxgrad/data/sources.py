"""Multi-source datasets: examples, deterministic per-source splits, loaders for local files.

GradEx asks which of n training *sources* help a *target* task, so every example carries the name
of its source. An example is a plain dict (JSON-serialisable, what every later stage reads)::

    {"example_id": "add/3f2a9c0d1b7e", "source": "add", "prompt": "12+9=",
     "completion": "2+9=11,1+0+1=2#21", "answer": "21"}

``example_id`` is ``<source>/<12 hex digits of sha1(prompt, completion)>``, with ``~1``, ``~2``...
appended to repeated (prompt, completion) pairs of one source in file order: the same in every run
and independent of row order. ``answer`` is the final answer where the source defines one (None
otherwise); accuracy is the exact match of :meth:`MultiSourceData.extract_answer` applied to a
generated completion against it.

:class:`MultiSourceData` holds, for every source, the splits ``train`` / ``validation`` / ``test``.
:meth:`MultiSourceData.from_examples` draws them per source with a seed derived from the global seed
and the source name (stable ``sha1``, not Python's salted ``hash``), so adding a source never moves
the examples of another. Selection uses the target's *validation* split; ``test`` is held out for
the final report (the authors' code selected on the target's test split: not here).

Loaders read local JSON, JSON Lines, CSV or parquet through ``datasets`` (imported lazily, so this
module and ``jaxgrad.data`` stay importable without it), or a Hub dataset by name when online.
``format`` names the layout of the rows:

* ``generic``: prompt / completion columns, optional source and answer columns (names configurable).
* ``alpaca``: instruction / input / output and a skill column as the source; the prompt is built
  with the Stanford Alpaca template (with or without the ``### Input:`` block).
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

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

SPLITS = ("train", "validation", "test")
FORMATS = ("generic", "alpaca", "flan", "cot", "bigbench")
FILE_TYPES = ("json", "jsonl", "csv", "parquet", "pickle")
_SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet",
             ".pq": "parquet", ".pkl": "pickle", ".pickle": "pickle"}

# Column roles of each format and their default column names. "source" may be None: the source is
# then the spec's `source` or the file's stem.
DEFAULT_COLUMNS: dict[str, dict[str, str | None]] = {
    "generic": {"prompt": "prompt", "completion": "completion", "source": "source", "answer": None},
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output",
               "source": "skill"},
    "flan": {"inputs": "inputs", "targets": "targets", "source": "_task_name"},
    "cot": {"question": "question", "rationale": "rationale", "answer": "answer", "source": None},
}

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
    order given, so ids stay unique.
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


def seed_for(seed: int, name: str) -> list[int]:
    """A numpy seed sequence for ``name`` under ``seed``: stable across runs and processes."""
    return [int(seed), int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "little")]


def _split_count(value: float | int, n: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a fraction in [0, 1) or a count >= 1, got {value!r}")
    if isinstance(value, (int, np.integer)) and value >= 1:
        return int(value)
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1) or a count >= 1, got {value!r}")
    return int(round(float(value) * n))


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
    """

    def __init__(self, splits: Mapping[str, Mapping[str, Sequence[dict]]], *,
                 sources: Sequence[str] | None = None, target: str | None = None,
                 kinds: Mapping[str, str] | None = None, answer_format: str | None = None):
        """Wraps already split examples: ``splits[split][source] -> list of example dicts``."""
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
        self.sources = sources
        self.target = target
        default_kinds = {n: ("target" if n == target else "unknown") for n in sources}
        stray = sorted(set(kinds or {}) - set(sources))
        if stray:
            raise ValueError(f"kinds names sources {stray} that are not in sources={sources}")
        self.kinds = dict(default_kinds, **(kinds or {}))
        self.answer_format = answer_format

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_examples(cls, examples: Iterable[dict], *, validation: float | int = 0.1,
                      test: float | int = 0.1, seed: int = 0, sources: Sequence[str] | None = None,
                      target: str | None = None, max_examples: int | None = None,
                      kinds: Mapping[str, str] | None = None,
                      answer_format: str | None = None) -> "MultiSourceData":
        """Splits examples per source, deterministically.

        Args:
          examples: example dicts (see the module docstring), any source order.
          validation: per source, a fraction in [0, 1) (rounded) or a count >= 1.
          test: same for the test split; train gets the rest (at least one example).
          seed: the split seed; each source's permutation is seeded by (seed, sha1(source)).
          sources: keep only these sources, in this order (None: all, sorted).
          target: the target source name, or None.
          max_examples: keep at most this many examples per source (a seeded random subset,
            drawn before splitting), or None for all.
          kinds: source -> kind; missing sources get "target"/"unknown".
          answer_format: see :data:`ANSWER_FORMATS`.

        Returns:
          The split data; within each split examples keep their input order.
        """
        by_source: dict[str, list[dict]] = {}
        for e in examples:
            by_source.setdefault(e["source"], []).append(e)
        if sources is not None:
            missing = [s for s in sources if s not in by_source]
            if missing:
                raise ValueError(f"sources {missing} have no examples; available: "
                                 f"{sorted(by_source)}")
            by_source = {s: by_source[s] for s in sources}
        if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
            raise ValueError(f"max_examples must be a positive int or None, got {max_examples!r}")
        splits: dict[str, dict[str, list[dict]]] = {s: {} for s in SPLITS}
        for name, exs in by_source.items():
            rng = np.random.default_rng(seed_for(seed, name))
            order = rng.permutation(len(exs))
            if max_examples is not None:
                order = order[:max_examples]
            n = len(order)
            n_val = _split_count(validation, n, "validation")
            n_test = _split_count(test, n, "test")
            if n_val + n_test >= n:
                raise ValueError(f"source {name!r} has {n} examples: too few for validation="
                                 f"{validation!r} ({n_val}) and test={test!r} ({n_test}) with at "
                                 "least one train example")
            parts = {"validation": order[:n_val], "test": order[n_val:n_val + n_test],
                     "train": order[n_val + n_test:]}
            for split, idx in parts.items():
                splits[split][name] = [exs[i] for i in np.sort(idx)]
        return cls(splits, sources=list(by_source) if sources is not None else None,
                   target=target, kinds=kinds, answer_format=answer_format)

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
        copy is then noisy mainly in its rationales). Prompts of the target's validation and test splits stay in those
        splits, so nothing held out is trained on. The copies are appended to :attr:`sources`,
        with kind ``"noisy"``; ids are ``<prefix><source>/<hash>`` like any example's.

        Raises ValueError for an unknown source, a name already taken, or a split with a single
        example (nothing to shuffle with).
        """
        sources = [sources] if isinstance(sources, str) else list(sources)
        unknown = [s for s in sources if s not in self.sources]
        if unknown:
            raise ValueError(f"label noise (noisy) names sources {unknown} that are not among the "
                             f"sources {self.sources}")
        splits = {s: {n: self.examples(s, n) for n in self.sources} for s in SPLITS}
        names = list(self.sources)
        for src in sources:
            self._check("train", [src])
            name = f"{prefix}{src}"
            if name in names:
                raise ValueError(f"label-noise source {name!r} already exists in {names}")
            names.append(name)
            for split in SPLITS:
                exs = splits[split][src]
                if len(exs) == 1:
                    raise ValueError(f"source {src!r} has one {split} example: a label-noise copy "
                                     "needs at least two to shuffle")
                order = np.random.default_rng(seed_for(seed, f"{name}/{split}")).permutation(
                    len(exs))
                donor = {int(i): int(j) for i, j in zip(order, np.roll(order, -1))}
                rows = [(name, e["prompt"], exs[donor[i]]["completion"], exs[donor[i]]["answer"])
                        for i, e in enumerate(exs)]
                splits[split][name] = make_examples(rows)
        kinds = dict(self.kinds, **{f"{prefix}{src}": "noisy" for src in sources})
        return MultiSourceData(splits, sources=names, target=self.target, kinds=kinds,
                               answer_format=self.answer_format)

    def summary(self) -> str:
        """One line per source: kind and split sizes."""
        width = max(len(s) for s in self.sources) if self.sources else 0
        lines = []
        for s in self.sources:
            counts = " ".join(f"{split}={self.n(split, s)}" for split in SPLITS)
            lines.append(f"{s:<{width}}  {self.kinds[s]:<9} {counts}")
        return "\n".join(lines)

    # -- persistence -------------------------------------------------------------------------

    def save(self, directory: str) -> None:
        """Writes ``data.json`` (sources, target, kinds, answer format) and ``<split>.jsonl``."""
        os.makedirs(directory, exist_ok=True)
        meta = {"sources": self.sources, "target": self.target, "kinds": self.kinds,
                "answer_format": self.answer_format}
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
                   answer_format=meta["answer_format"])

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
      file_type: one of :data:`FILE_TYPES`; None infers it from the file suffix.
      columns: role -> column name, overriding :data:`DEFAULT_COLUMNS` of the format (set
        ``source`` to None to name the source after ``source``/the file instead of a column).
      source: a fixed source name for every row (overrides the source column).
      answer_format: for ``generic`` with an answer column, how answers are extracted from
        generations (:data:`ANSWER_FORMATS`; default "full"). ``cot`` always uses "cot".
      sources: keep only these sources, in this order; None keeps all, sorted.
      target: the target source, or None.
      validation: per source, fraction or count of validation examples.
      test: per source, fraction or count of test examples.
      max_examples: at most this many examples per source (seeded subset), or None.
      seed: split seed.
      allow_pickle: permit ``file_type="pickle"``; unpickling runs code from the file, so it is
        refused unless asked for.
      noisy: sources that get a label-noise copy ``noisy_<source>``
        (:meth:`MultiSourceData.with_label_noise`, seeded by ``seed``), appended after the others.
      kinds: source -> kind ("related", "unrelated", ...: the ground truth a ranking is checked
        against, :func:`jaxgrad.pipeline.ranking_auc`); the target is "target", noisy copies
        "noisy", unnamed sources "unknown".
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
    validation: float | int = 0.1
    test: float | int = 0.1
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


def _read_pickle(path: str) -> dict[str, list]:
    import pandas as pd  # lazy: a dependency of datasets

    obj = pd.read_pickle(path)
    if isinstance(obj, pd.DataFrame):
        return {c: obj[c].tolist() for c in obj.columns}
    if hasattr(obj, "to_dict") and hasattr(obj, "column_names"):  # a pickled datasets.Dataset
        return obj.to_dict()
    if isinstance(obj, list) and all(isinstance(r, Mapping) for r in obj):
        cols = list(dict.fromkeys(k for r in obj for k in r))
        return {c: [r.get(c) for r in obj] for c in cols}
    raise TypeError(f"{path}: pickle holds a {type(obj).__name__}; expected a pandas DataFrame, "
                    "a datasets.Dataset or a list of dicts")


def _read_columns(spec: SourcesSpec, path: str | None) -> tuple[dict[str, list], str]:
    """Column name -> values of one file (or the Hub dataset), and a label naming it."""
    try:
        import datasets  # lazy: keep `import jaxgrad.data` light
    except ImportError as e:  # pragma: no cover - environment dependent
        raise ImportError("loading data files needs the `datasets` package: pip install "
                          "datasets") from e
    if path is None:
        label = f"hub dataset {spec.hub!r}"
        try:
            ds = datasets.load_dataset(spec.hub, spec.hub_config, split=spec.hub_split)
        except (ConnectionError, OSError) as e:
            raise ConnectionError(
                f"could not load {label} (config={spec.hub_config!r}, split={spec.hub_split!r}):"
                f" the Hugging Face Hub is unreachable or the dataset is not cached ({e}). "
                "Offline, download it elsewhere and pass a local file as `path`.") from e
        return ds.to_dict(), label
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    file_type = _file_type(path, spec.file_type)
    if file_type == "pickle":
        if not spec.allow_pickle:
            raise ValueError(f"{path}: refusing to load a pickle file: unpickling runs arbitrary "
                             "code from the file. Convert it to parquet or JSON Lines, or pass "
                             "allow_pickle=True if you trust its origin.")
        return _read_pickle(path), path
    builder = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet"}[file_type]
    ds = datasets.load_dataset(builder, data_files=path, split="train")
    return ds.to_dict(), path


def _column(table: dict[str, list], name: str, role: str, label: str) -> list:
    if name not in table:
        raise ValueError(f"{label}: missing column {name!r} (the {role} column); the file has "
                         f"columns {sorted(table)}")
    return table[name]


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and np.isnan(value):  # empty CSV cells
        return ""
    return str(value)


def read_examples(spec: Any) -> list[dict]:
    """Reads the rows of ``spec`` (a :class:`SourcesSpec` or mapping) as examples, unsplit.

    Use it to combine files of different formats: concatenate the lists and call
    :meth:`MultiSourceData.from_examples`. Raises ValueError naming the missing column, the file
    and the columns it has; ValueError listing the supported formats for an unknown format.
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
    unknown = sorted(set(spec.columns) - set(roles))
    if unknown:
        raise ValueError(f"columns has unknown roles {unknown} for format {spec.format!r}; its "
                         f"roles are {sorted(roles)}")
    cols = dict(roles, **spec.columns)
    paths: list[str | None]
    if spec.path is None:
        paths = [None]
    elif isinstance(spec.path, (str, os.PathLike)):
        paths = [os.fspath(spec.path)]
    else:
        paths = [os.fspath(p) for p in spec.path]
    rows: list[tuple[str, str, str, str | None]] = []
    for path in paths:
        table, label = _read_columns(spec, path)
        n = len(next(iter(table.values()))) if table else 0
        if spec.source is not None:
            names = [spec.source] * n
        elif cols["source"] is not None:
            names = [_text(v) for v in _column(table, cols["source"], "source", label)]
        else:
            stem = spec.hub if path is None else os.path.splitext(os.path.basename(path))[0]
            names = [stem] * n
        rows.extend(_format_rows(spec, cols, table, label, names))
    return make_examples(rows)


def _read_bigbench(spec: SourcesSpec) -> list[dict]:
    from jaxgrad.data import bigbench

    if spec.path is None or spec.hub is not None:
        raise ValueError("format 'bigbench' reads local task files: set path (a task directory, "
                         "a task.json, a directory of tasks, or a list); hub is not supported")
    for field, value in (("columns", spec.columns), ("source", spec.source),
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
        answers = get("answer") if cols["answer"] is not None else [None] * len(prompts)
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
             COT_COMPLETION.format(rationale=r.strip(), answer=a.strip()), a.strip())
            for s, q, r, a in zip(names, questions, rationales, answers)]


def load_sources(spec: Any) -> MultiSourceData:
    """Reads and splits the sources described by ``spec``.

    Args:
      spec: a :class:`SourcesSpec`, a mapping with its field names, or an ml_collections
        ConfigDict with them. Unknown keys are errors.

    Returns:
      The per-source train / validation / test splits.

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
                                           **spec.columns)["answer"] is not None:
        answer_format = spec.answer_format or "full"
    else:
        answer_format = spec.answer_format
    kinds = dict(spec.kinds or {})
    noisy = list(spec.noisy or ())
    data = MultiSourceData.from_examples(
        examples, validation=spec.validation, test=spec.test, seed=spec.seed,
        sources=spec.sources, target=spec.target, max_examples=spec.max_examples,
        answer_format=answer_format,
        kinds={k: v for k, v in kinds.items() if k not in {f"noisy_{n}" for n in noisy}} or None)
    return data.with_label_noise(noisy, seed=spec.seed) if noisy else data
