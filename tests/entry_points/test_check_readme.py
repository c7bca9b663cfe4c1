"""scripts/check_readme.py: the README's `make demo` tables against a run's report, one set of
tables per machine (CPU families round differently, so each prints its own figures). The cell
comparison itself (``compare_tables``) is tested in tests/pipeline/test_report.py."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import REPO, SMALL_REPORT


def _check(tmp_path, readme_section: str, report: str):
    (tmp_path / "README.md").write_text("# x\n\n## What `make demo` shows\n\n" + readme_section
                                        + "\n## Next section\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    (tmp_path / "report.md").write_text(report)
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", "check_readme.py"),
                           f"--readme={tmp_path / 'README.md'}",
                           f"--report={tmp_path / 'report.md'}"],
                          capture_output=True, text=True, timeout=120)


def test_one_figure_block_per_machine_the_report_must_match_one_entirely(tmp_path):
    """Rounding differs between CPU families, so the README keeps one set of demo tables per
    machine; a report matches when it equals one set (not a mix of cells from both)."""
    other = SMALL_REPORT.replace("-0.2925", "-0.2200").replace("0.3216", "0.0876")
    section = (f"<!-- figures: Intel Xeon -->\n{SMALL_REPORT}<!-- /figures -->\n\n"
               f"<details>\n\n<!-- figures: AMD EPYC -->\n{other}<!-- /figures -->\n\n</details>\n")
    for report, machine in ((SMALL_REPORT, "Intel Xeon"), (other, "AMD EPYC")):
        out = _check(tmp_path, section, report)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"OK: README's demo tables ({machine}) vs" in out.stdout, out.stdout
    mixed = SMALL_REPORT.replace("-0.2925", "-0.2200")  # one cell of each: matches neither set
    out = _check(tmp_path, section, mixed)
    assert out.returncode == 1 and "DIFFERENT" in out.stdout, out.stdout
    assert "(1 differences" in out.stdout, out.stdout  # from the closest set
    # the table after the section is not compared
    out = _check(tmp_path, SMALL_REPORT, SMALL_REPORT)
    assert out.returncode == 0 and "OK: README's demo tables vs" in out.stdout, out.stdout
