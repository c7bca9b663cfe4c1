r"""Final GradEx stage: fine-tune the *base* model (fresh LoRA adapters) on selected sources.

  python scripts/finetune.py --config=configs/demo.py --workdir=checkpoints/demo \
      --config.finetune.sources=add,add_digit,sub
  python scripts/finetune.py --config=configs/demo.py --workdir=checkpoints/demo \
      --config.finetune.selection_file=checkpoints/demo/selection/selection.json
  # a run with groups.by = cluster: its clusters (and unclustered sources) by name
  python scripts/finetune.py --config=configs/demo.py --workdir=checkpoints/demo \
      --config.finetune.sources=c01,c03 \
      --config.finetune.groups_file=checkpoints/demo/groups/groups.json

Validates on the target's validation split, reports the target's test split at the end, and
writes ``<workdir>/finetune/<name>/{ckpt/, metrics.jsonl, adapter/, sources.json, config.json}``.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from jaxgrad.common.checkout import make_configs_importable
from jaxgrad.common.cli import run_app

make_configs_importable()  # user configs may `from configs import demo`

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/demo.py or configs/demo.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory, e.g. checkpoints/demo.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import json

    import jax

    from jaxgrad.common.distributed import initialize_distributed
    from jaxgrad.rundir import resolved_config
    from jaxgrad.pipeline.runtime import enable_compilation_cache, resume_hint_on_interrupt
    from jaxgrad.pipeline.finetune import finetune

    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    enable_compilation_cache()  # $JAXGRAD_COMPILATION_CACHE, default ~/.cache/jaxgrad/xla
    initialize_distributed(_CONFIG.value.train.distributed)
    print(f"JAX {jax.__version__}, process {jax.process_index()}/{jax.process_count()}, "
          f"devices: {jax.devices()}", flush=True)

    # resolved_config: the base model is <workdir>/base when the config pretrains one (demo).
    config = resolved_config(_CONFIG.value, _WORKDIR.value)
    pretrain = bool((_CONFIG.value.get("base") or {}).get("pretrain", False))
    if pretrain and not os.path.isdir(config.model.name_or_path):
        raise app.UsageError(f"--workdir={_WORKDIR.value} has no pretrained base "
                             f"({config.model.name_or_path}): run scripts/meta_train.py (or "
                             "scripts/run_pipeline.py --stages=base) with this workdir first")
    with resume_hint_on_interrupt():
        result = finetune(config, _WORKDIR.value)
    print(json.dumps({"step": result.step, "metrics": result.metrics}, indent=1, default=float))
    print(f"[jaxgrad] fine-tune in {result.workdir} (adapter/ in PEFT format, metrics.jsonl, "
          "sources.json)", flush=True)


if __name__ == "__main__":
    run_app(main)
