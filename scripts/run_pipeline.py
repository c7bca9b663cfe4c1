r"""Run the whole GradEx pipeline (or some stages) from one config.

  python scripts/run_pipeline.py --config=configs/demo.py --workdir=checkpoints/demo
  python scripts/run_pipeline.py --config=configs/demo.py --workdir=checkpoints/demo \
      --stages=estimates,selection,report

Stages whose artefacts exist in --workdir are skipped (resume after an interruption), provided
they were computed under the same config (per-stage fingerprints in <workdir>/stages.json). After
a config change the run stops with the changed keys; --on_config_change=rerun deletes the changed
stage's artefacts and everything downstream and recomputes them (or use a new --workdir).
"""

from absl import flags, logging
from ml_collections import config_flags

from jaxgrad.common.checkout import make_configs_importable
from jaxgrad.common.cli import run_app
from jaxgrad.pipeline import STAGES, define_on_config_change_flag, run_pipeline
from jaxgrad.pipeline.runtime import enable_compilation_cache, resume_hint_on_interrupt

make_configs_importable()  # user configs may `from configs import demo`

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created if missing).")
_STAGES = flags.DEFINE_list("stages", list(STAGES), f"Stages to run, in order: {','.join(STAGES)}.")
_ON_CHANGE = define_on_config_change_flag()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    enable_compilation_cache()  # $JAXGRAD_COMPILATION_CACHE, default ~/.cache/jaxgrad/xla
    with resume_hint_on_interrupt():
        out = run_pipeline(_CONFIG.value, _WORKDIR.value, _STAGES.value,
                           on_config_change=_ON_CHANGE.value)
    if "report" in out:
        print(open(out["report"]).read())


if __name__ == "__main__":
    run_app(main)
