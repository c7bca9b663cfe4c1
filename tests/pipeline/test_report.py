"""jaxgrad.pipeline.report: the significance sentence says what the 95% intervals separate, in
plain counts; the next command to run; the stages' times; the report of the tiny pipeline run
(the session fixture ``run_dir``) against its tables; scripts/check_readme.py's comparison of the
README's tables with a report; source names kept readable in its cells."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil

import numpy as np
import pytest
from helpers import REPO, SMALL_REPORT, fixture
from helpers.runs import rerun_selection

from configs import demo
from jaxgrad.pipeline.report import compare_tables, markdown_tables, significance_line


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
    from jaxgrad.pipeline.next_step import next_steps_lines

    argv = ["run_pipeline.py", "--config=configs/demo.py", "--config.train.seed=3",
            "--config.pipeline.finetune_runs=selection,random", "--config.finetune.name=x"]
    text = "\n".join(next_steps_lines(demo.get_config(), "/w", {"selected": ["add"]}, argv=argv))
    assert "--config.train.seed=3" in text
    assert "--config.pipeline." not in text and "--config.finetune.name=x" not in text, text


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


# ------------------------------------------------------------------------------------------------
# The report of the tiny pipeline run


def test_report_scores_agree_with_estimates_table(run_dir):
    with open(os.path.join(run_dir, "estimates", "estimates.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(r["converged"] == "True" for r in rows)
    selection = json.load(open(os.path.join(run_dir, "selection", "selection.json")))
    report = open(os.path.join(run_dir, "report.md")).read()
    for source in selection["sources"]:
        losses = [float(r["loss"]) for r in rows if source in json.loads(r["sources"])]
        expected = -np.mean(losses)  # loss: lower is better, reported negated
        i = selection["sources"].index(source)
        assert selection["scores"][i] == pytest.approx(expected, rel=1e-6)
        line = re.search(rf"\| \d+ \| {source} \| \w+ \| (-?[\d.]+) \|", report)
        assert line, f"{source} missing from the report's selection table"
        assert float(line.group(1)) == pytest.approx(expected, abs=1e-4)
    selected = json.load(open(os.path.join(run_dir, "finetune", "selection", "sources.json")))
    assert selected["sources"] == selection["selected"]
    m = re.search(r"\| selection \| [^|]+ \| (\d+) \| ([\d.]+) \|", report)
    assert int(m.group(1)) == selected["n_train"] == 32 * len(selected["sources"])
    assert float(m.group(2)) == pytest.approx(selected["metrics"]["test_loss"], abs=1e-4)


def test_report_says_what_next_what_is_significant_and_how_good_theta_star_is(run_dir, tmp_path):
    """issue 16, item 7: the report gives the next command, which ranks the intervals separate,
    θ*'s validation loss per source, one name per quantity, and lists hand-made fine-tunes."""
    from jaxgrad.pipeline.report import write_report
    from jaxgrad.pipeline.runtime import python_command

    report = open(os.path.join(run_dir, "report.md")).read()
    sel = os.path.join(run_dir, "selection", "selection.json")
    # the interpreter that ran the pipeline (bare `python` fails without the venv activated)
    assert f"\n    {shlex.quote(python_command())} scripts/finetune.py --config=" in report
    assert python_command() != "python" and os.path.isfile(python_command())
    assert f"--config.finetune.selection_file={sel}" in report
    assert "Significance: the 95% intervals separate" in report
    assert re.search(r"The selection cut is (not )?significant", report)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "meta_train", "metrics.jsonl"))]
    last = [r for r in rows if "val_loss/add" in r][-1]
    for source in ("add", "copy", "noisy_add"):
        m = re.search(rf"\| {source} \| ([\d.]+) \|", report.split("## θ* (meta-training)")[1])
        assert m and float(m.group(1)) == pytest.approx(last[f"val_loss/{source}"], abs=1e-4)
    from jaxgrad.pipeline.report import estimated_quantity

    output_fn = demo.get_config("tiny").gradients.output_fn
    assert f"of the estimated {estimated_quantity('loss', output_fn)}" in report  # the estimate's
    assert "logistic loss" in estimated_quantity("loss", "logit_odds")  # name ...
    assert "test token cross-entropy" in report  # ... is not the fine-tunes' test loss's
    workdir = str(tmp_path / "run")
    shutil.copytree(run_dir, workdir)
    os.makedirs(os.path.join(workdir, "finetune", "mine"))
    shutil.copy(os.path.join(workdir, "finetune", "all", "sources.json"),
                os.path.join(workdir, "finetune", "mine", "sources.json"))
    write_report(demo.get_config("tiny"), workdir)
    assert "| mine (by scripts/finetune.py) |" in open(os.path.join(workdir, "report.md")).read()
    record = json.load(open(os.path.join(workdir, "finetune", "all", "run.json")))
    record["values"]["train.learning_rate"] = 0.5  # made with another learning rate
    json.dump(record, open(os.path.join(workdir, "finetune", "mine", "run.json"), "w"))
    write_report(demo.get_config("tiny"), workdir)
    assert ("| mine (by scripts/finetune.py; unlike the runs above: train.learning_rate 0.5) |"
            in open(os.path.join(workdir, "report.md")).read())


def test_the_reports_next_command_runs_and_returns_the_tables_selection_run(run_dir, tmp_path):
    """The tiny variant fine-tunes the selection for all of train.num_steps already: the report's
    next command names that run, so running it returns the recorded run instead of training a
    duplicate under the sources' name (new-user trial of issue 16)."""
    import subprocess
    import sys

    from jaxgrad.pipeline.next_step import next_steps_lines

    workdir = str(tmp_path / "run")
    shutil.copytree(run_dir, workdir)
    selection = json.load(open(os.path.join(workdir, "selection", "selection.json")))
    lines = next_steps_lines(demo.get_config("tiny"), workdir, selection,
                             argv=["run_pipeline.py", "--config=configs/demo.py:tiny"])
    command = shlex.split(lines[-2].strip())
    assert command[1] == "scripts/finetune.py" and "--config.finetune.name=selection" in command
    before = sorted(os.listdir(os.path.join(workdir, "finetune")))
    out = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True,
                         timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "finetune selection: reused" in out.stdout, out.stdout[-2000:]
    assert sorted(os.listdir(os.path.join(workdir, "finetune"))) == before, "trained a duplicate"
    recorded = json.load(open(os.path.join(workdir, "finetune", "selection", "sources.json")))
    printed = json.loads(out.stdout[out.stdout.index("{"):out.stdout.rindex("}") + 1])
    assert printed["metrics"]["test_loss"] == pytest.approx(recorded["metrics"]["test_loss"])


def test_the_next_command_for_a_longer_budget_has_a_name_that_does_not_pin_the_steps():
    from jaxgrad.pipeline.next_step import next_steps_lines

    lines = next_steps_lines(demo.get_config(), "/w", {"selected": ["add"]},
                             argv=["x", "--config=configs/demo.py"])
    text = "\n".join(lines)
    assert "--config.finetune.name=selection_full" in text and "selection_1500" not in text
    assert "`train.num_steps`, 1500 steps, into `/w/finetune/selection_full/`" in text, text


def test_report_names_the_stepwise_search(run_dir, tmp_path):
    from jaxgrad.pipeline.report import write_report

    out, _, _ = rerun_selection(run_dir, tmp_path, method="forward", top=2)
    write_report(demo.get_config("tiny"), str(tmp_path / "run"))
    report = open(tmp_path / "run" / "report.md").read()
    assert "Selected by `forward` stepwise selection" in report
    assert f"{out['stepwise']['n_evaluated']} subsets scored" in report


# ------------------------------------------------------------------------------------------------
# scripts/check_readme.py's comparison (issue 16, item 6): the README's demo tables against a run's
# report, cell by cell


def test_tables_parsed_without_the_rule_line():
    assert markdown_tables(SMALL_REPORT) == [[["rank", "source", "score"], ["1", "add", "-0.2925"],
                                        ["2", "sub", "-0.3214"]],
                                       [["run", "test token cross-entropy"], ["selection", "0.3216"]]]


def test_equal_excerpt_passes_and_every_kind_of_difference_is_named():
    assert compare_tables(SMALL_REPORT, SMALL_REPORT) == []
    excerpt = (SMALL_REPORT.replace("-0.3214", "-0.3300").replace("| 2 | sub", "| 2 | succ")
               .replace("test token cross-entropy", "test loss"))
    problems = compare_tables(excerpt, SMALL_REPORT)
    assert "rank '2', score: README '-0.3300', report '-0.3214'" in problems
    assert "rank '2', source: README 'succ', report 'sub'" in problems
    assert any("header ['run', 'test loss'] is not in the report" in p for p in problems)
    assert compare_tables(SMALL_REPORT.replace("-0.3214", "-0.3300"), SMALL_REPORT, atol=0.01) == []
    assert compare_tables(SMALL_REPORT + "| 3 | x | 0 |\n", SMALL_REPORT) != []


def test_report_cells_keep_names_readable():
    from jaxgrad.pipeline.report import _name, _names

    assert _names(["ünï 名", "a,b"]) == '"ünï 名", "a,b"', "non-ASCII must not become \\u escapes"
    assert _names(["c++", "x+y"]) == "c++, x+y"
    assert _name(" lead ") == '" lead "' and _name("lead") == "lead"
    assert _name("a|b") == "a\\|b"


def test_zero_width_intervals_apart_are_not_said_to_overlap():
    """The tiny demo's selection (tests/fixtures/run_v1): three intervals of zero width, one of
    them 2.4e-7 wide in float32, printed [-3.9168, -3.9168], [-3.9169, -3.9169], [-3.9249,
    -3.9249]: disjoint points, none separated, all three zero-width."""
    with open(fixture(os.path.join("run_v1", "selection", "selection.json"))) as f:
        selection = json.load(f)
    line = significance_line(selection)
    assert "overlap" not in line.split("The selection cut")[0], line
    assert ("no two neighbouring ranks (all 2 neighbouring pairs are apart by zero-width "
            "intervals only: no evidence either way)") in line, line
    assert "All 3 of the intervals have zero width" in line, line
    assert "is, by zero-width intervals only, above" in line, line


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
