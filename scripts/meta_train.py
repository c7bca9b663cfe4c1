r"""Stage 1 of GradEx: LoRA-fine-tune on every source's train split (θ* in <workdir>/meta_train/).

  python scripts/meta_train.py --config=configs/demo.py --workdir=checkpoints/demo

Runs the pipeline's ``base`` stage first (it pretrains the demo's tiny base; with a real model it
does nothing), then ``meta_train``: writes ``<workdir>/meta_train/{ckpt/<step>/, metrics.jsonl,
adapter/, config.json, done.json}``; a rerun with the same workdir resumes from the latest
checkpoint. Equivalent to ``scripts/run_pipeline.py --stages=base,meta_train`` (same config
fingerprint checks). Any config key can be overridden on the command line
(``--config.train.epochs=2``).
"""

from jaxgrad.pipeline import stage_script

if __name__ == "__main__":
    stage_script(["base", "meta_train"])
