"""Progress bars that stay readable in log files.

On a terminal (or in a notebook) a bar redraws several times a second; written to a file or a CI
log, each redraw is another line, so there it redraws at most every ``LOG_INTERVAL_S`` seconds.
"""

from __future__ import annotations

import sys

LOG_INTERVAL_S = 30.0


def _interactive() -> bool:
    if getattr(sys.stderr, "isatty", lambda: False)():
        return True
    return "ipykernel" in sys.modules  # tqdm.auto draws a widget there


def progress_bar(iterable=None, **kwargs):
    """``tqdm.auto.tqdm`` with a redraw interval suited to where stderr goes."""
    from tqdm.auto import tqdm

    if not _interactive():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(iterable, **kwargs)
