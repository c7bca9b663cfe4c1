"""Process-wide settings for jaxgrad's command-line entry points: the compilation cache, how an
interrupted or refused run ends, the interpreter to name in printed commands.

:func:`enable_compilation_cache` turns on JAX's persistent compilation cache
(``jax_compilation_cache_dir``): XLA executables are stored on disk, keyed by the program, the
JAX/XLA version, the compile options and the devices, and read back by later processes instead of
being compiled again. A pipeline compiles the same train, evaluation, per-sample-gradient and
surrogate programs in every run and in every fine-tune; on 2 CPU cores compilation is most of a
small run's time (the tiny demo pipeline in a fresh process: 50 s with the cache off, 44 s with an
empty cache, 21 s with a warm one; ``benchmarks/compile_cache.py``). Results do not depend on
it: a cached executable is the one XLA would compile.

The scripts' other set-up, :func:`~jaxgrad.common.checkout.make_configs_importable`, runs before
their flags load a config file and lives in :mod:`jaxgrad.common.checkout`, so that it imports
neither JAX nor the pipeline.
"""

from __future__ import annotations

import contextlib
import os
import sys

import jax

from jaxgrad.config import ConfigError
from jaxgrad.pipeline.fingerprint import ConfigChangedError

ENV = "JAXGRAD_COMPILATION_CACHE"
DEFAULT_DIR = os.path.join("~", ".cache", "jaxgrad", "xla")
OFF = ("", "0", "off", "none", "false")


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Enable JAX's persistent compilation cache in ``path``; the directory used, or None.

    Args:
      path: the cache directory; default ``$JAXGRAD_COMPILATION_CACHE``, else
        ``~/.cache/jaxgrad/xla``. ``"off"`` (or ``""``, ``"0"``, ``"none"``, ``"false"``)
        leaves the cache off. A ``JAX_COMPILATION_CACHE_DIR`` set by the user wins over both.

    Every program is cached, however quick its compile (``jax_persistent_cache_min_compile_time_secs
    = 0``): a run compiles hundreds of small programs whose compile times add up. Must be called
    before the first compilation to cover it.
    """
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    path = os.environ.get(ENV, DEFAULT_DIR) if path is None else path
    if path.strip().lower() in OFF:
        return None
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


@contextlib.contextmanager
def resume_hint_on_interrupt():
    """For the command-line scripts: Ctrl-C becomes one line and exit status 130 (stages already
    done and the last training checkpoint are kept, and the same command resumes from them); a
    run directory computed under other settings (``ConfigChangedError``) or a config refused
    before any stage (``ConfigError``) prints its message, which names the changes or the setting
    and the ways out, and exits with status 2, without a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        print("\n[jaxgrad] interrupted — rerun the same command to resume (finished stages and "
              "the last checkpoint are kept)", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except (ConfigChangedError, ConfigError) as e:
        print(f"\n{e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def python_command() -> str:
    """The interpreter running this process as a command to print for the user: relative to the
    working directory when it lies under it (``.venv/bin/python`` after ``make``), else absolute.
    A bare ``python`` fails where the virtual environment is not activated."""
    exe = sys.executable or "python"
    rel = os.path.relpath(exe)
    return rel if not rel.startswith(os.pardir) else exe
