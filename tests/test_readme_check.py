"""scripts/check_readme.py's comparison (issue 16, item 6): the README's demo tables against a
run's report, cell by cell."""

from __future__ import annotations

from jaxgrad.pipeline.report import compare_tables, markdown_tables

REPORT = """# report

| rank | source | score |
|---|---|---|
| 1 | add | -0.2925 |
| 2 | sub | -0.3214 |

text

| run | test token cross-entropy |
|---|---|
| selection | 0.3216 |
"""


def test_tables_parsed_without_the_rule_line():
    assert markdown_tables(REPORT) == [[["rank", "source", "score"], ["1", "add", "-0.2925"],
                                        ["2", "sub", "-0.3214"]],
                                       [["run", "test token cross-entropy"], ["selection", "0.3216"]]]


def test_equal_excerpt_passes_and_every_kind_of_difference_is_named():
    assert compare_tables(REPORT, REPORT) == []
    excerpt = (REPORT.replace("-0.3214", "-0.3300").replace("| 2 | sub", "| 2 | succ")
               .replace("test token cross-entropy", "test loss"))
    problems = compare_tables(excerpt, REPORT)
    assert "rank '2', score: README '-0.3300', report '-0.3214'" in problems
    assert "rank '2', source: README 'succ', report 'sub'" in problems
    assert any("header ['run', 'test loss'] is not in the report" in p for p in problems)
    assert compare_tables(REPORT.replace("-0.3214", "-0.3300"), REPORT, atol=0.01) == []
    assert compare_tables(REPORT + "| 3 | x | 0 |\n", REPORT) != []
