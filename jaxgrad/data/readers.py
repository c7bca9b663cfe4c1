"""File formats to columns of text: local JSON, JSON Lines, CSV, TSV, parquet and pickle files,
or a Hub dataset.

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

Pickle files load only with ``allow_pickle=True``: unpickling runs arbitrary code from the file.
The paper's code shipped its data as pickles; convert them once (``df.to_parquet``) and load the
parquet instead.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

if TYPE_CHECKING:
    from jaxgrad.data.sources import SourcesSpec

FILE_TYPES = ("json", "jsonl", "csv", "tsv", "parquet", "pickle")
_SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv",
             ".parquet": "parquet", ".pq": "parquet", ".pkl": "pickle", ".pickle": "pickle"}


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
