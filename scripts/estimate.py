r"""Stages 3-4: surrogate fits over the sampled subsets and their estimated target metrics into <workdir>/estimates/estimates.csv (needs gradients; resumable).

  python scripts/estimate.py --config=configs/demo.py --workdir=checkpoints/demo

Equivalent to `scripts/run_pipeline.py --stages=estimates`; skipped when its artefact exists.
"""

from jaxgrad.pipeline import stage_script

if __name__ == "__main__":
    stage_script("estimates")
