"""Command-line parsing shared by the scripts: absl's flags with ml_collections' config flags, where
an override of a missing key or an unreadable ``--config`` file is one line and exit status 2
instead of a chained traceback. absl is imported when a script runs, not with the package.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Callable, Sequence


def run_app(main: Callable[[list[str]], Any]) -> None:
    """``absl.app.run(main)`` with :func:`parse_flags_or_exit` as its flags parser."""
    from absl import app

    app.run(main, flags_parser=parse_flags_or_exit)


def parse_flags_or_exit(argv: list[str]) -> list[str]:
    """absl's flag parsing (``absl.app.parse_flags_with_usage``), plus one line and exit status 2
    for what ml_collections raises as a traceback: an override of a key the config does not have
    (``--config.pipeline.finetune_run=x``: the flag, the key and ml_collections' did-you-mean) and
    a ``--config`` file that cannot be loaded (read lazily by ml_collections, so it is loaded
    here, before any stage). Bad values (``--config.train.num_steps=abc``) are absl's own
    one-line ``FATAL Flags parsing error``. Returns the remaining arguments, as absl's parser."""
    from absl import app, flags

    try:
        args = app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:  # ml_collections: no such key (with did-you-mean)
        _flag_error(f"{_override_flag(argv, e)}: {_key_error_text(e)}")
    if "config" in flags.FLAGS:
        try:
            flags.FLAGS["config"].value.keys()  # ml_collections loads the file on first access
        except (OSError, SyntaxError, ImportError, AttributeError) as e:
            first = str(e).splitlines()
            detail = first[-1].strip() if first else type(e).__name__
            _flag_error(f"--config={flags.FLAGS['config'].config_filename}: cannot load the "
                        f"config file ({detail})")
    return args


def _key_error_text(error: BaseException) -> str:
    """ml_collections wraps a KeyError (whose text is a quoted repr) in an AttributeError."""
    error = _innermost(error)
    text = str(error.args[0]) if error.args else str(error)
    lines = [line.strip().strip("'\"") for line in text.splitlines() if line.strip()]
    key, *advice = lines or [text]
    hint = re.search(r'Did you mean "([^"]+)"', " ".join(advice))
    return f"the config has no key '{key}'" + (f" (did you mean '{hint[1]}'?)" if hint else "")


def _override_flag(argv: Sequence[str], error: BaseException) -> str:
    """The ``--config.<path>`` argument whose path names the missing key (else every override)."""
    overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    key = re.findall(r"'([^'\\]+)", str(_innermost(error)))
    hits = [a for a in overrides if key and key[0] in a[len("--config."):].split(".")]
    return "flag " + (hits[0] if hits else ", ".join(overrides) or "--config")


def _innermost(error: BaseException) -> BaseException:
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    return error


def _flag_error(message: str) -> None:
    print(f"FATAL Flags parsing error: {message}\nPass --helpshort or --helpfull to see help on "
          "flags.", file=sys.stderr, flush=True)
    raise SystemExit(2)
