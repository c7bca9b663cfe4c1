r"""Run the whole GradEx pipeline (or some stages) from one config.

  python scripts/run_pipeline.py --config=configs/demo.py --workdir=checkpoints/demo
  python scripts/run_pipeline.py --config=configs/demo.py --workdir=checkpoints/demo \
      --stages=estimates,selection,report

Stages whose artefacts exist in --workdir are skipped (resume after an interruption).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from jaxgrad.pipeline import STAGES, run_pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created if missing).")
_STAGES = flags.DEFINE_list("stages", list(STAGES), f"Stages to run, in order: {','.join(STAGES)}.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    out = run_pipeline(_CONFIG.value, _WORKDIR.value, _STAGES.value)
    if "report" in out:
        print(open(out["report"]).read())


if __name__ == "__main__":
    app.run(main)
