r"""Fidelity of the estimates: really fine-tune θ* on K subsets of the estimates table and compare
the true target loss with the estimates (needs the estimates stage; resumable per subset).

  python scripts/fidelity.py --config=configs/demo.py --workdir=checkpoints/demo
  python scripts/run_pipeline.py --config=configs/demo.py --workdir=checkpoints/demo --stages=report

The pipeline stage ``fidelity`` with ``pipeline.fidelity`` switched on (this script switches it on).
Writes <workdir>/fidelity/fidelity.json; the report stage adds its table and fidelity.png. The
settings are the config's ``fidelity`` section (jaxgrad/config.py).
"""

from jaxgrad.pipeline import stage_script

if __name__ == "__main__":
    stage_script("fidelity", overrides={"pipeline.fidelity": True})
