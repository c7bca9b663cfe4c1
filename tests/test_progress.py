"""Progress bars redraw rarely when stderr is a log file, as often as tqdm likes on a terminal."""

import io
import sys

from jaxgrad.common import progress


def test_log_file_gets_a_long_redraw_interval(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    bar = progress.progress_bar(range(3), file=sys.stderr)
    assert bar.mininterval == progress.LOG_INTERVAL_S
    assert list(bar) == [0, 1, 2]


def test_terminal_keeps_tqdm_default(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    bar = progress.progress_bar(total=3, file=sys.stderr)
    assert bar.mininterval < progress.LOG_INTERVAL_S
    bar.close()


def test_training_loop_pattern_writes_few_redraws_to_a_log(monkeypatch):
    """update(1) every step and set_postfix(..., refresh=False) every few steps, as train.py does:
    a log file gets a few draws, not one per step."""
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    bar = progress.progress_bar(total=500, file=log)
    for step in range(500):
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{1.0 / (step + 1):.4f}", refresh=False)
    bar.close()
    draws = log.getvalue().count("\r")
    assert draws <= 4, f"{draws} redraws written to a log file for 500 steps"
