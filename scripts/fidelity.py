r"""Fidelity of the estimates: really fine-tune θ* on K subsets and compare (after the pipeline).

  python scripts/fidelity.py --config=configs/demo.py --workdir=checkpoints/demo
  python scripts/run_pipeline.py --config=configs/demo.py --workdir=checkpoints/demo --stages=report

Writes <workdir>/fidelity/fidelity.json; the report stage adds it (table + fidelity.png).
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from jaxgrad.fidelity import run_fidelity

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of a finished pipeline run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    out = run_fidelity(_CONFIG.value, _WORKDIR.value)
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    app.run(main)
