r"""Stage 5: random-ensemble source scores with bootstrap intervals, the selection and the baselines into <workdir>/selection/selection.json (needs estimates).
(Named select_sources.py, not select.py: a script called select.py would shadow the standard
library module `select` for everything it imports.)

  python scripts/select_sources.py --config=configs/demo.py --workdir=checkpoints/demo

Equivalent to `scripts/run_pipeline.py --stages=selection`; skipped when its artefact exists.
"""

from jaxgrad.pipeline import stage_script

if __name__ == "__main__":
    stage_script("selection")
