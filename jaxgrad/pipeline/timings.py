"""The stage timings of a run directory, ``<workdir>/timings.jsonl``: one row per stage per run
of the pipeline, written by :func:`append_timing`, and the seconds each stage's current artefacts
took to compute (:func:`stage_seconds`, the report's "Stages" table)."""

from __future__ import annotations

import json
import os
import time
from typing import Sequence

import jax

from jaxgrad import rundir


def append_timing(workdir: str, stage: str, seconds: float, reused: bool = False,
                  fingerprint: str | None = None, fresh: bool = True) -> None:
    """One row per stage run; ``reused``: its artefacts existed under the same fingerprint, or it
    had nothing to do (a stage switched off): the report shows the seconds of computing runs.
    ``fresh``: the stage had no artefacts when it started; a run that was not fresh resumed or
    extended the computation of the rows before it under the same ``fingerprint`` (an
    interruption, a fine-tune run added to ``pipeline.finetune_runs``, more subsets), and the
    report adds their seconds. Only process 0 writes."""
    if jax.process_index() != 0:
        return
    row = {"stage": stage, "seconds": round(seconds, 2), "time": time.time(), "reused": reused,
           "fingerprint": fingerprint, "fresh": fresh}
    with open(os.path.join(workdir, rundir.TIMINGS_FILE), "a") as f:
        f.write(json.dumps(row) + "\n")


def stage_seconds(rows: Sequence[dict]) -> dict[str, tuple[float, int]]:
    """Per stage, the seconds spent computing its current artefacts and in how many runs, from
    the rows of ``timings.jsonl`` (:func:`append_timing`), oldest first.

    Rows of runs that reused the stage are skipped. A row that is not ``fresh`` (the stage had
    artefacts when it started: it resumed after an interruption or extended them, e.g. a run
    added to ``pipeline.finetune_runs``) adds its seconds to the rows before it under the same
    fingerprint; a fresh row, or another fingerprint, starts the count again. Rows written
    before ``fresh`` was recorded count as fresh (the last one's seconds, as before)."""
    out: dict[str, tuple[float, int]] = {}
    fingerprints: dict[str, str | None] = {}
    for r in rows:
        if r.get("reused", False):
            continue
        stage, seconds = r["stage"], float(r["seconds"])
        extends = (not r.get("fresh", True) and stage in out
                   and fingerprints[stage] == r.get("fingerprint"))
        total, runs = out[stage] if extends else (0.0, 0)
        out[stage] = (total + seconds, runs + 1)
        fingerprints[stage] = r.get("fingerprint")
    return out
