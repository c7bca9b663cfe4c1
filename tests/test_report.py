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
