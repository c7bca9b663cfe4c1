"""Steps 3–4 as a pipeline stage: surrogate fits for random subsets of the units and their
estimated target metrics, one row per subset in ``<workdir>/estimates/estimates.csv``
(:data:`ESTIMATE_FIELDS`), computed by :class:`jaxgrad.estimate.scorer.SurrogateScorer`; and
reading that table back (:func:`read_estimates`, :func:`subset_sources`, :func:`subset_rows`)."""

from __future__ import annotations

import csv
import json
import os
import warnings
from typing import Sequence

import jax
import numpy as np

from jaxgrad import rundir
from jaxgrad.common.checks import section_dict
from jaxgrad.common.distributed import barrier
from jaxgrad.common.progress import progress_bar
from jaxgrad.estimate.scorer import SurrogateScorer
from jaxgrad.estimate.subsets import sample_subsets, subset_size
from jaxgrad.groups.stage import pipeline_units

ESTIMATE_FIELDS = ("subset", "sources", "n_samples", "converged", "n_iter", "loss", "accuracy",
                   "mean_output", "exact_loss")


def _sample(n_units: int, m: int, size: int, seed: int, notes: list | None = None) -> np.ndarray:
    """:func:`sample_subsets`, its warning about repeated subsets said once as a line of the stage
    with the config keys to change (a raw ``UserWarning`` names a source line of jaxgrad):
    printed, or appended to ``notes`` (the stage prints them only when it computes rows)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        subsets = sample_subsets(n_units, m, size, seed)
    for w in caught:
        line = (f"[jaxgrad] estimates: {str(w.message).removeprefix('sample_subsets: ')} "
                f"(config.surrogate.num_subsets = {m}, subset_size = {size} of {n_units}: fewer "
                "subsets or another size would not repeat any)")
        if notes is None:
            print(line, flush=True)
        else:
            notes.append(line)
    return subsets


def stage_estimates(config, workdir: str) -> str:
    """Steps 3–4: surrogate fits for m random subsets and their estimated target metrics.

    Rows already in ``estimates.csv`` are not recomputed (run_pipeline has checked that they were
    computed under the same config).
    """
    s = section_dict(config, "surrogate")
    os.makedirs(os.path.join(workdir, rundir.ESTIMATES_DIR), exist_ok=True)
    table = os.path.join(workdir, rundir.ESTIMATES_FILE)
    sources = pipeline_units(config, workdir).names
    size = subset_size(len(sources), s["subset_size"], name="config.surrogate.subset_size")
    notes: list[str] = []  # said only when rows are computed (not when the stage is reused)
    subsets = _sample(len(sources), int(s["num_subsets"]), size, int(s["seed"]), notes)
    # Rows are reused only under the same config: run_pipeline checks the stage's fingerprint
    # (jaxgrad.pipeline.fingerprint; it replaced estimates/settings.json, still read in old run
    # directories).
    done_rows = read_estimates(table) if os.path.isfile(table) else []
    todo = [i for i in range(len(subsets)) if i >= len(done_rows)]
    if not todo:
        return table
    for note in notes:
        print(note, flush=True)
    score = SurrogateScorer(config, workdir, sources)
    chunk = int(s["chunk_subsets"])
    new_file = not done_rows
    # Every process fits every chunk (the subsets are sharded over all devices of all
    # processes); process 0 writes the table, the others wait for it at the end.
    writes = jax.process_index() == 0
    with open(table if writes else os.devnull, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=ESTIMATE_FIELDS)
        if new_file:
            writer.writeheader()
        starts = range(todo[0], len(subsets), chunk)
        # Closed however the loop ends: no bar line after what an interruption prints.
        with progress_bar(total=len(subsets), initial=todo[0], desc="estimates", unit="subset",
                          disable=not config.train.get("progress", True)
                          or jax.process_index() != 0) as bar:
            for c0 in starts:
                rows = subsets[c0 : c0 + chunk]
                out = score(rows)
                bar.update(rows.shape[0])
                for r in range(rows.shape[0]):
                    writer.writerow({
                        "subset": c0 + r,
                        "sources": json.dumps([sources[j] for j in np.flatnonzero(rows[r])]),
                        **{k: v[r] for k, v in out.items()},
                    })
                fh.flush()
    barrier("estimates")
    return table


def read_estimates(path: str) -> list[dict]:
    """Rows of ``estimates.csv`` as written, plus ``source_list`` (see :func:`subset_sources`).

    Args:
      path: the ``estimates.csv`` written by the estimate stage (``ESTIMATE_FIELDS`` columns).

    Returns:
      One dict per row (``csv.DictReader``: every value a string), with ``source_list`` added:
      the subset's source names, a list of str.

    Raises:
      OSError: the file cannot be read. ValueError: a ``sources`` cell that is JSON but not a
        list of strings (:func:`subset_sources`).
    """
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["source_list"] = subset_sources(r["sources"])
    return rows


def subset_sources(value: str | Sequence[str]) -> list[str]:
    """The source names of a subset as ``estimates.csv`` and ``fidelity.json`` record them.

    Names are arbitrary strings (``c++``, ``a,b``, ``q&a/v2``), so a subset is stored as a JSON
    list, never as names joined by a separator. A list is returned as is; a string is parsed as
    a JSON list, or, when it is not one, split on ``+`` (run directories written before JSON).

    Raises:
      ValueError: a JSON value that is not a list of strings.
    """
    if not isinstance(value, str):
        return [str(s) for s in value]
    if value.startswith("["):
        names = json.loads(value)
        if not isinstance(names, list) or not all(isinstance(s, str) for s in names):
            raise ValueError(f"estimates: a subset's sources must be a JSON list of names, got "
                             f"{value!r}")
        return names
    return value.split("+") if value else []


def subset_rows(rows: Sequence[dict], sources: Sequence[str]) -> np.ndarray:
    """The subsets of :func:`read_estimates` ``rows`` as the S×M boolean rows over ``sources``
    that :class:`~jaxgrad.estimate.scorer.SurrogateScorer` fits (to refit the table's subsets).

    >>> subset_rows([{"source_list": ["b"]}, {"source_list": ["a", "c"]}], ["a", "b", "c"])
    array([[False,  True, False],
           [ True, False,  True]])
    """
    return np.array([[s in r["source_list"] for s in sources] for r in rows], dtype=bool)
