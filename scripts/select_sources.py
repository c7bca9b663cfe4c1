r"""Stage 5: random-ensemble source scores with bootstrap intervals, the selection and the baselines into <workdir>/selection/selection.json (needs estimates).
(Named select_sources.py, not select.py: a script called select.py would shadow the standard
library module `select` for everything it imports.)

  python scripts/select_sources.py --config=configs/demo.py --workdir=checkpoints/demo

Equivalent to `scripts/run_pipeline.py --stages=selection`; skipped when its artefact exists.
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from jaxgrad.pipeline import resolved_config, stage_selection

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    out = stage_selection(resolved_config(_CONFIG.value, _WORKDIR.value), _WORKDIR.value)
    print(out if isinstance(out, str) else json.dumps(out, indent=1, default=str)[:4000])


if __name__ == "__main__":
    app.run(main)
