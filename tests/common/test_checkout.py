"""jaxgrad.common.checkout: a user's config that imports the shipped ones (``from configs import
demo``) loads when the scripts run from another directory without PYTHONPATH (issue 16, item 5)."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import REPO


def test_a_user_config_importing_the_shipped_ones_needs_no_pythonpath(tmp_path):
    """issue 16, item 5: `from configs import demo` in a config outside the repository works
    when the scripts are run from another directory without PYTHONPATH."""
    (tmp_path / "mine.py").write_text("from configs import demo\n\n\ndef get_config():\n"
                                      "    return demo.get_config('tiny')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "run_pipeline.py"),
                          f"--config={tmp_path / 'mine.py'}", f"--workdir={tmp_path / 'run'}",
                          "--stages=nope"], cwd=tmp_path, env=env, text=True,
                         capture_output=True, timeout=300)
    assert "No module named 'configs'" not in out.stderr, out.stderr[-2000:]
    assert "unknown pipeline stages ['nope']" in out.stderr, out.stderr[-2000:]  # config loaded
