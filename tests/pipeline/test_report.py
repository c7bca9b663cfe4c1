"""The report's significance sentence says what the 95% intervals separate, in plain counts."""

from __future__ import annotations

from jaxgrad.pipeline.report import significance_line


def _selection(intervals, selected):
    names = list(intervals)
    return {"sources": names, "ranking": names, "selected": selected,
            "scores": [sum(intervals[n]) / 2 for n in names],
            "ci_low": [intervals[n][0] for n in names], "ci_high": [intervals[n][1] for n in names]}


def test_nothing_separated_says_all_pairs_overlap():
    line = significance_line(_selection({"a": (0.2, 0.5), "b": (0.1, 0.4), "c": (0.0, 0.3)},
                                        ["a"]))
    assert line.startswith("Significance: the 95% intervals separate no two neighbouring ranks "
                           "(all 2 neighbouring pairs overlap: their order may be noise)."), line
    assert "the other" not in line
    assert "The selection cut is not significant" in line


def test_separated_pairs_are_named_and_the_rest_counted():
    line = significance_line(_selection({"a": (0.6, 0.9), "b": (0.1, 0.5), "c": (0.0, 0.3),
                                         "d": (-0.1, 0.2)}, ["a"]))
    assert line.startswith("Significance: the 95% intervals separate a > b; the other 2 "
                           "neighbouring pairs are not separated"), line
    assert "The selection cut is significant" in line


def test_every_pair_separated_has_no_remainder():
    line = significance_line(_selection({"a": (0.6, 0.9), "b": (0.3, 0.5)}, ["a", "b"]))
    assert line == "Significance: the 95% intervals separate a > b.", line


def test_next_command_keeps_config_overrides_but_not_pipeline_or_finetune_ones():
    """`--config.pipeline.finetune_runs=...` (how the README adds a baseline) means nothing to
    scripts/finetune.py: the printed command leaves it out, as it leaves out finetune.*."""
    from configs import demo
    from jaxgrad.pipeline.report import next_steps_lines

    argv = ["run_pipeline.py", "--config=configs/demo.py", "--config.train.seed=3",
            "--config.pipeline.finetune_runs=selection,random", "--config.finetune.name=x"]
    text = "\n".join(next_steps_lines(demo.get_config(), "/w", {"selected": ["add"]}, argv=argv))
    assert "--config.train.seed=3" in text
    assert "--config.pipeline." not in text and "--config.finetune.name=x" not in text, text


def test_stage_seconds_add_the_runs_that_resumed_or_extended_a_stage():
    """A fine-tune run added later (or a resumed interruption) is not the stage's whole time: the
    report adds the seconds of the runs that computed the current artefacts (new-user trial of
    issue 16: after adding a run, the table showed only the new run's seconds)."""
    from jaxgrad.pipeline.timings import stage_seconds

    rows = [
        {"stage": "finetune", "seconds": 60.0, "reused": False, "fingerprint": "a", "fresh": True},
        {"stage": "report", "seconds": 1.0, "reused": False, "fingerprint": "r", "fresh": True},
        {"stage": "finetune", "seconds": 0.1, "reused": True, "fingerprint": "a", "fresh": False},
        {"stage": "finetune", "seconds": 20.0, "reused": False, "fingerprint": "a", "fresh": False},
    ]
    assert stage_seconds(rows)["finetune"] == (80.0, 2)
    # recomputed under another config (artefacts deleted first): the count starts again
    rerun = {"stage": "finetune", "seconds": 50.0, "reused": False, "fingerprint": "b",
             "fresh": True}
    assert stage_seconds(rows + [rerun])["finetune"] == (50.0, 1)
    # another fingerprint without a fresh start still starts again
    assert stage_seconds(rows + [{**rerun, "fresh": False}])["finetune"] == (50.0, 1)
    # rows from before "fresh" was recorded: the last computing run, as before
    old = [{"stage": "estimates", "seconds": 5.0}, {"stage": "estimates", "seconds": 7.0}]
    assert stage_seconds(old) == {"estimates": (7.0, 1)}


def test_the_stages_table_says_in_how_many_runs(tmp_path):
    import json

    from jaxgrad import rundir
    from jaxgrad.pipeline.report import _timings_section

    rows = [{"stage": "finetune", "seconds": 60.0, "reused": False, "fingerprint": "a",
             "fresh": True},
            {"stage": "finetune", "seconds": 20.0, "reused": False, "fingerprint": "a",
             "fresh": False},
            {"stage": "selection", "seconds": 6.0, "reused": False, "fingerprint": "s",
             "fresh": True}]
    with open(tmp_path / rundir.TIMINGS_FILE, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    assert _timings_section(str(tmp_path))[4:6] == ["| finetune | 80.0 (in 2 runs) |",
                                                    "| selection | 6.0 |"]
