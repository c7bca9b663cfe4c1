"""Progress bars redraw rarely when stderr is a log file, as often as tqdm likes on a terminal."""

import io
import sys

from jaxgrad import progress


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
