"""jaxgrad.pipeline.runtime: the persistent compilation cache the command-line entry points turn
on, and the one-line messages (no traceback) of an interrupted run, a changed config and a config
refused before any stage."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from helpers import REPO


def _run(code, env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, text=True,
                          capture_output=True, timeout=300)


def test_a_second_process_reads_the_compiled_program_from_the_cache(tmp_path):
    """What makes the demo's second and later runs fast: the first process writes the
    executable, the second finds it (jax's persistent-cache hit counter) and computes the same."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")
           and k != "JAX_COMPILATION_CACHE_DIR"}
    env["JAXGRAD_COMPILATION_CACHE"] = str(tmp_path / "cache")
    code = """
        import jax, jax.numpy as jnp
        from jax._src import monitoring
        from jaxgrad.pipeline.runtime import enable_compilation_cache
        hits = []
        monitoring.register_event_listener(
            lambda e, **kw: hits.append(e) if e == "/jax/compilation_cache/cache_hits" else None)
        print(enable_compilation_cache())
        f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum() * 3.0)
        print(float(f(jnp.arange(64.0).reshape(8, 8) / 64)), len(hits))
    """
    first, second = _run(code, env), _run(code, env)
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    path, value1, hits1 = first.stdout.split()
    _, value2, hits2 = second.stdout.split()
    assert path == str(tmp_path / "cache") and os.listdir(path), "nothing written to the cache"
    assert hits1 == "0" and int(hits2) >= 1 and value1 == value2, (hits1, hits2)


def test_cache_can_be_switched_off(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["JAXGRAD_COMPILATION_CACHE"] = "off"
    env["HOME"] = str(tmp_path)  # where the default cache directory (~/.cache/jaxgrad) would go
    code = """
        import jax
        from jaxgrad.pipeline.runtime import enable_compilation_cache as e
        print(e())
        jax.jit(lambda x: x * 2.0)(1.0)  # a compilation a cache would store
        print(jax.config.jax_compilation_cache_dir)
    """
    out = _run(code, env)
    assert out.returncode == 0 and out.stdout.split() == ["None", "None"], out.stderr[-2000:]
    assert not (tmp_path / ".cache").exists(), "switched off, yet something was cached"


def test_ctrl_c_gives_one_line_and_status_130():
    """issue 16, item 8: an interrupted run says how to resume instead of printing a traceback."""
    code = """
        from jaxgrad.pipeline.runtime import resume_hint_on_interrupt
        with resume_hint_on_interrupt():
            raise KeyboardInterrupt
    """
    out = _run(code, dict(os.environ))
    assert out.returncode == 130, out.stderr
    assert "interrupted — rerun the same command to resume" in out.stderr
    assert "Traceback" not in out.stderr, out.stderr


def test_a_changed_config_prints_its_message_without_a_traceback():
    code = """
        from jaxgrad.pipeline.fingerprint import ConfigChangedError
        from jaxgrad.pipeline.runtime import resume_hint_on_interrupt
        with resume_hint_on_interrupt():
            raise ConfigChangedError("train.learning_rate: 0.1 → 0.5", stage="finetune",
                                     workdir="w", changes=[])
    """
    out = _run(code, dict(os.environ))
    assert out.returncode == 2 and "train.learning_rate: 0.1 → 0.5" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr


def test_a_config_refused_before_any_stage_is_one_line_from_the_scripts(tmp_path):
    """scripts/run_pipeline.py with a misspelt run name: the refusal (raised by validate_config
    before any stage) is printed as its message with status 2, not as a 24-line traceback."""
    script = os.path.join(REPO,
                          "scripts", "run_pipeline.py")
    out = subprocess.run([sys.executable, script, "--config=configs/demo.py:tiny",
                          f"--workdir={tmp_path / 'run'}", "--config.pipeline.finetune_runs=al"],
                         capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(script)))
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "config.pipeline.finetune_runs: unknown runs ['al']" in out.stderr, out.stderr[-2000:]
    assert "did you mean ['all']" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()
