"""Sources from a config: the ``data.files`` section (:class:`SourcesSpec`) read and split into a
:class:`~jaxgrad.data.multisource.MultiSourceData` (:func:`load_sources`), and the ``data``
section, files or the embedded synthetic tasks, loaded (:func:`load_data`).

``format`` names the layout of the rows:

* ``generic``: prompt / completion columns, optional source and answer columns (names configurable).
* ``alpaca``: instruction / input / output and a skill column as the source; the prompt is built
  with the Stanford Alpaca template, without the ``### Input:`` block when the input is blank
  (empty, whitespace only, null or missing), so rows differing only in such inputs are the same
  example (a duplicate, see :mod:`jaxgrad.data.multisource`, **Duplicates**).
* ``flan``: inputs / targets / ``_task_name``; a newline is appended to the inputs unless they end
  with a newline or a colon (the convention of the open-instruct FLAN v2 mixture).
* ``cot``: the reasoning-teacher layout, question / rationale / answer; the completion is
  ``"{rationale} Therefore, the answer is {answer}."`` and the answer is extracted back by
  :func:`jaxgrad.data.examples.extract_cot_answer`.
* ``bigbench``: BIG-bench JSON tasks (``path``: a task directory, a ``task.json``, a directory of
  tasks, or a list), one source per task or subtask, read by :mod:`jaxgrad.data.bigbench` (prompt
  and completion as BIG-bench lays them out; answers read back with
  :func:`jaxgrad.data.examples.extract_leading_answer`).

Ground truth for checking a ranking: ``kinds`` labels sources (``related``, ``unrelated``, ...),
and ``noisy`` plants label-noise copies ``noisy_<source>`` of chosen sources (their prompts with
the completions of other examples of the same source and split: see
:meth:`MultiSourceData.with_label_noise`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

from jaxgrad._compat import moved_names
from jaxgrad.config import DEFAULT_COLUMNS, DEFAULT_TEST, DEFAULT_VALIDATION, FORMATS, as_fields
from jaxgrad.data import bigbench
from jaxgrad.data.examples import (ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT, COT_COMPLETION,
                                   COT_PROMPT, extract_leading_answer, make_examples)
from jaxgrad.data.multisource import MultiSourceData
from jaxgrad.data.readers import _answer, _column, _read_columns, _text
from jaxgrad.data.synthetic import SyntheticSpec, synthetic_sources

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
        against, :func:`jaxgrad.select.stage.ranking_auc`); the target is "target", noisy copies
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


def read_examples(spec: Any) -> list[dict]:
    """Reads the rows of ``spec`` (a :class:`SourcesSpec` or mapping) as examples, unsplit.

    Use it to combine files of different formats: concatenate the lists and call
    :meth:`MultiSourceData.from_examples`. Every text field is the text of the file, never a
    type-inferred rewrite of it (module docstring, **Text as written**): JSON numbers keep their
    literal, CSV / TSV cells are strings, blank values are ``""`` (text) or None (answers).

    Args:
      spec: format, ``path`` (file(s)) or ``hub`` (a dataset name), ``columns``, ``source``.

    Returns:
      Example dicts (:func:`make_examples`), in file and row order.

    Raises:
      ValueError: a missing column (naming it, the file and the columns it has); an unknown
        format or column role; not exactly one of path and hub; a file without rows; a blank
        source cell. FileNotFoundError: data files that do not exist (all listed).
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


def load_data(section: Any):
    """``MultiSourceData`` from ``config.data``: ``kind`` "synthetic" (SyntheticSpec fields in
    ``data.synthetic``) or "files" (SourcesSpec fields in ``data.files``).

    Args:
      section: the ``data`` config section (a ``ConfigDict`` or a mapping).

    Returns:
      The ``MultiSourceData`` (:func:`synthetic_sources` or :func:`load_sources`).

    Raises:
      ValueError: an unknown ``kind``, unknown fields, or as the two builders raise.
    """
    d = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    kind = d.get("kind")
    if kind == "synthetic":
        fields = as_fields(d.get("synthetic", {}), SyntheticSpec, "data.synthetic")
        if fields.get("target") == "":
            fields["target"] = None
        return synthetic_sources(SyntheticSpec(**fields))
    if kind == "files":
        # Config files cannot hold None where a command line may set a string: "" / () / 0 mean
        # "not set" for the optional fields.
        files = {k: (None if v in ("", ()) or (k == "max_examples" and v == 0) else v)
                 for k, v in dict(d["files"]).items()}
        if isinstance(files.get("path"), (list, tuple)):
            files["path"] = list(files["path"])
        return load_sources(files)
    raise ValueError(f"config.data.kind must be 'synthetic' or 'files', got {kind!r}")


__getattr__ = moved_names(__name__)  # names that moved out of this module (jaxgrad._compat)
