r"""Stage 2: projected per-sample gradients of every source's train split and the target's validation split into <workdir>/gradients/ (needs meta_train).

  python scripts/compute_gradients.py --config=configs/demo.py --workdir=checkpoints/demo

Equivalent to `scripts/run_pipeline.py --stages=gradients`; skipped when its artefact exists.
"""

from jaxgrad.pipeline import stage_script

if __name__ == "__main__":
    stage_script("gradients")
