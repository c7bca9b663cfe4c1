"""Command-line entry points of the pipeline: the per-stage scripts' ``main`` (:func:`stage_script`)
and the ``--on_config_change`` flag every script shares. absl and ml_collections are imported
when a script runs, not with the package.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from jaxgrad.common.checkout import make_configs_importable
from jaxgrad.common.cli import run_app
from jaxgrad.pipeline.run import run_pipeline
from jaxgrad.pipeline.runtime import enable_compilation_cache, resume_hint_on_interrupt


def stage_script(stage: str | Sequence[str], overrides: dict[str, Any] | None = None) -> None:
    """Entry point of the thin per-stage scripts: ``--config`` and ``--workdir`` flags, one stage
    (or a few, in order: the result of the last is printed).

    Runs ``absl.app.run`` (flags parsed from ``sys.argv``; it exits the process, status 2 on a
    flag error) and :func:`run_pipeline` with ``--on_config_change``.

    Args:
      stage: a stage name of :data:`STAGES`, or several, run in order.
      overrides: dotted config keys set before running (e.g. the switch of an optional stage).
    """
    stages = [stage] if isinstance(stage, str) else list(stage)
    from absl import flags
    from absl import logging as absl_logging
    from ml_collections import config_flags

    make_configs_importable()  # user configs may `from configs import demo`
    config_flag = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).")
    workdir_flag = flags.DEFINE_string("workdir", None, "Run directory.")
    change_flag = define_on_config_change_flag()
    flags.mark_flags_as_required(["config", "workdir"])

    def main(argv):
        del argv
        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every checkpoint at INFO
        enable_compilation_cache()  # $JAXGRAD_COMPILATION_CACHE, default ~/.cache/jaxgrad/xla
        config = config_flag.value
        for key, value in (overrides or {}).items():
            section, name = key.rsplit(".", 1)
            config[section][name] = value
        with resume_hint_on_interrupt():
            out = run_pipeline(config, workdir_flag.value, stages,
                               on_config_change=change_flag.value).get(stages[-1])
        print(out if isinstance(out, str) else json.dumps(out, indent=1, default=str)[:4000])

    run_app(main)


def define_on_config_change_flag():
    """``--on_config_change=error|rerun`` (default: ``config.pipeline.on_config_change``)."""
    from absl import flags

    return flags.DEFINE_enum(
        "on_config_change", None, ["error", "rerun"],
        "When a stage's artefacts in --workdir were computed under another config: 'error' "
        "(default; names the changed keys, deletes nothing) or 'rerun' (deletes that stage's "
        "artefacts and everything downstream, then recomputes). Default: "
        "config.pipeline.on_config_change.")
