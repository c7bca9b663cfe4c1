"""What the stages and the report say (new-user trial): the estimates stage's note about repeated
subsets only when it computes rows, and a significance sentence that agrees with the intervals
the report's table prints, float32 rounding included."""

from __future__ import annotations

import json
import os

import numpy as np

from jaxgrad.pipeline.report import significance_line

HERE = os.path.dirname(os.path.abspath(__file__))


def _estimates_run(tmp_path, monkeypatch, rows_done: int):
    """stage_estimates of demo.py:tiny (3 sources, subsets of one, 6 subsets: repeats) with
    ``rows_done`` rows already in estimates.csv; the scorer is a stand-in."""
    from configs import demo
    from jaxgrad import rundir
    from jaxgrad.estimate import stage
    from jaxgrad.groups.units import Units

    class Scorer:
        def __init__(self, config, workdir, sources):
            pass

        def __call__(self, rows):
            n = rows.shape[0]
            return {k: np.zeros(n) for k in stage.ESTIMATE_FIELDS[2:]}

    config = demo.get_config("tiny")
    sources = ["add", "copy", "noisy_add"]
    monkeypatch.setattr(stage, "pipeline_units", lambda config, workdir: Units.of_sources(sources))
    monkeypatch.setattr(stage, "SurrogateScorer", Scorer)
    workdir = str(tmp_path)
    if rows_done:
        os.makedirs(os.path.join(workdir, rundir.ESTIMATES_DIR), exist_ok=True)
        with open(os.path.join(workdir, rundir.ESTIMATES_FILE), "w") as f:
            f.write(",".join(stage.ESTIMATE_FIELDS) + "\n")
            for i in range(rows_done):
                f.write(f'{i},"[""add""]",1,True,1,0,0,0,0\n')
    return stage.stage_estimates(config, workdir)


def test_repeated_subsets_note_only_when_the_stage_computes_rows(tmp_path, monkeypatch, capsys):
    _estimates_run(tmp_path / "new", monkeypatch, rows_done=0)
    assert "[jaxgrad] estimates: " in capsys.readouterr().out, "the note is gone altogether"
    _estimates_run(tmp_path / "done", monkeypatch, rows_done=6)  # reused: every row is there
    out = capsys.readouterr().out
    assert "[jaxgrad] estimates:" not in out, f"a reused stage printed {out!r}"


def test_zero_width_intervals_apart_are_not_said_to_overlap():
    """The tiny demo's selection (tests/fixtures/run_v1): three intervals of zero width, one of
    them 2.4e-7 wide in float32, printed [-3.9168, -3.9168], [-3.9169, -3.9169], [-3.9249,
    -3.9249]: disjoint points, none separated, all three zero-width."""
    with open(os.path.join(HERE, "fixtures", "run_v1", "selection", "selection.json")) as f:
        selection = json.load(f)
    line = significance_line(selection)
    assert "overlap" not in line.split("The selection cut")[0], line
    assert ("no two neighbouring ranks (all 2 neighbouring pairs are apart by zero-width "
            "intervals only: no evidence either way)") in line, line
    assert "All 3 of the intervals have zero width" in line, line
    assert "is, by zero-width intervals only, above" in line, line


def _selection(intervals, selected):
    names = list(intervals)
    return {"sources": names, "ranking": names, "selected": selected,
            "scores": [sum(intervals[n]) / 2 for n in names],
            "ci_low": [intervals[n][0] for n in names], "ci_high": [intervals[n][1] for n in names]}


def test_float32_rounding_neither_widens_nor_separates_intervals():
    """Ends within float32 rounding of each other are equal: a 1-ulp-wide interval is zero-width,
    and intervals 1 ulp apart overlap (b and c); wide ones are told apart as before."""
    ulp = float(np.spacing(np.float32(4.0)))
    line = significance_line(_selection({"a": (4.0, 4.0 + ulp), "b": (3.5, 4.0 - ulp)}, ["a"]))
    assert "1 of the intervals have zero width" in line, line
    assert "all 1 neighbouring pairs overlap" in line and "cut is not significant" in line, line
    line = significance_line(_selection({"a": (4.0, 4.5), "b": (3.9 + ulp, 3.95),
                                         "c": (3.5, 3.9), "d": (3.0, 3.4)}, ["a"]))
    assert line.startswith("Significance: the 95% intervals separate a > b, c > d; the other 1 "
                           "neighbouring pairs are not separated (1 overlap: their order may be "
                           "noise)."), line
