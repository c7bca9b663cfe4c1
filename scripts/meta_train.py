r"""Stage 1 of GradEx: LoRA-fine-tune on every source's train split (θ* in <workdir>/meta_train/).

  python scripts/meta_train.py --config=configs/demo.py --workdir=checkpoints/demo

Writes ``<workdir>/meta_train/{ckpt/<step>/, metrics.jsonl, adapter/, config.json}``; a rerun with
the same workdir resumes from the latest checkpoint. Any config key can be overridden on the
command line (``--config.train.epochs=2``).
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/demo.py or configs/demo.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory, e.g. checkpoints/demo.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    from jaxgrad import train

    train.initialize_distributed(_CONFIG.value.train.distributed)
    logging.info("JAX %s, process %d/%d, devices: %s", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.devices())
    result = train.meta_train(_CONFIG.value, _WORKDIR.value)
    logging.info("meta-training done at step %d (best checkpoint %s): %s", result.step,
                 result.best_step, result.metrics)


if __name__ == "__main__":
    app.run(main)
