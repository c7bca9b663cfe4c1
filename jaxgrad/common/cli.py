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
    """Parse ``argv`` into absl's ``FLAGS``; every error is one line on stderr, prefixed
    ``FATAL Flags parsing error:`` as absl's own parser does, and exit status 2 (absl exits 1,
    and prints ml_collections' errors as chained or embedded tracebacks):

    * an unknown flag or a bad value (``--workdri=x``, ``--config.train.num_steps=abc``): absl's
      message;
    * an override of a key the config does not have (``--config.pipeline.finetune_run=x``): the
      flag, the key and ml_collections' did-you-mean;
    * a ``--config`` file that cannot be loaded (missing, a syntax error, a failing import, no
      ``get_config``, an unknown variant): the file and the error's last line (ml_collections
      reads the file lazily, so it is loaded here, before any stage).

    Returns the arguments left after the flags (the program name first), as absl's parser."""
    from absl import flags

    try:
        args = flags.FLAGS(argv)
    except flags.Error as e:
        if "Error whilst parsing config file" in str(e):  # get_config raised: its traceback
            _config_error(argv, e)
        _flag_error(_one_line(str(e)))
    except (AttributeError, KeyError) as e:
        if isinstance(_innermost(e), KeyError):  # ml_collections: no such key (did-you-mean)
            _flag_error(f"{_override_flag(argv, e)}: {_key_error_text(e)}")
        _config_error(argv, e)
    except Exception as e:  # the config file's own code raised (syntax error, failed import)
        _config_error(argv, e)
    if "config" in flags.FLAGS:
        try:
            flags.FLAGS["config"].value.keys()  # ml_collections loads the file on first access
        except Exception as e:  # whatever the user's config file raises
            _config_error(argv, e)
    return args


def _config_error(argv: Sequence[str], error: BaseException) -> None:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    detail = f"{type(error).__name__}: {last}" if isinstance(error, SyntaxError) or not last \
        else last
    if "has no attribute 'get_config'" in last:
        detail = "it defines no get_config()"
    if isinstance(error, SyntaxError) and error.filename:
        detail = f"{error.msg} at {error.filename}:{error.lineno}"
    _flag_error(f"{_config_flag(argv)}: cannot load the config file ({detail})")


def _one_line(message: str) -> str:
    """A message on one line: an embedded traceback (ml_collections puts the config file's in the
    flag error) is cut to its last line, the exception itself, after the text before it."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return message.strip()
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        head = lines[0].rstrip(":")
        return f"{head}: {lines[-1]}" if head != lines[-1] else head
    return " ".join(lines)


def _config_flag(argv: Sequence[str]) -> str:
    return next((a for a in argv[1:] if a.startswith("--config=")), "--config")


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
    print(f"FATAL Flags parsing error: {message} (--helpshort lists the flags)", file=sys.stderr,
          flush=True)
    raise SystemExit(2)
