r"""Stage 2: projected per-sample gradients of every source's train split and the target's validation split into <workdir>/gradients/ (needs meta_train).

  python scripts/compute_gradients.py --config=configs/demo.py --workdir=checkpoints/demo

Equivalent to `scripts/run_pipeline.py --stages=gradients`; skipped when its artefact exists.
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from jaxgrad.pipeline import resolved_config, stage_gradients

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    out = stage_gradients(resolved_config(_CONFIG.value, _WORKDIR.value), _WORKDIR.value)
    print(out if isinstance(out, str) else json.dumps(out, indent=1, default=str)[:4000])


if __name__ == "__main__":
    app.run(main)
