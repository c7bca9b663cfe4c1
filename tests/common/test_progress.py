"""Progress bars redraw rarely when stderr is a log file, as often as tqdm likes on a terminal.

What is checked is what the stream receives (the number of redraws), not tqdm's settings.
"""

import io
import sys
import time

from jaxgrad.common import progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _redraws(stream, monkeypatch, updates: int, pause_s: float = 0.0) -> int:
    """Redraws (carriage returns) a bar writes to ``stream`` for ``updates`` steps ``pause_s``
    apart, used as train/loop.py uses it: update(1), and a postfix without a refresh every few steps."""
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    bar = progress.progress_bar(total=updates, file=stream)
    for step in range(updates):
        if pause_s:
            time.sleep(pause_s)
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{1.0 / (step + 1):.4f}", refresh=False)
    bar.close()
    return stream.getvalue().count("\r")


def test_training_loop_pattern_writes_few_redraws_to_a_log(monkeypatch):
    draws = _redraws(io.StringIO(), monkeypatch, 500)
    assert draws <= 4, f"{draws} redraws written to a log file for 500 steps"


def test_log_file_is_not_redrawn_for_every_slow_step(monkeypatch):
    """Steps 0.15 s apart: a terminal shows each one, a log file gets only the first and last."""
    terminal = _redraws(_Terminal(), monkeypatch, 4, pause_s=0.15)
    log = _redraws(io.StringIO(), monkeypatch, 4, pause_s=0.15)
    assert terminal >= 4, f"a terminal bar redrew {terminal} times for 4 steps 0.15 s apart"
    assert log <= 2, f"a log file got {log} redraws for 4 steps 0.15 s apart"


def test_iterating_a_bar_yields_every_item(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert list(progress.progress_bar(range(3), file=sys.stderr)) == [0, 1, 2]
