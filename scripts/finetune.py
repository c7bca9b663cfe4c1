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
    from jaxgrad.pipeline.runtime import enable_compilation_cache, resume_hint_on_interrupt

    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    enable_compilation_cache()  # $JAXGRAD_COMPILATION_CACHE, default ~/.cache/jaxgrad/xla
    # A refused config (ConfigError: a bad value, no base in --workdir, an unreadable selection
    # file) is one line and exit status 2, before any model is loaded; Ctrl-C one line, 130.
    with resume_hint_on_interrupt():
        _finetune(_CONFIG.value, _WORKDIR.value)


def _finetune(config, workdir: str) -> None:
    import json

    import jax

    from jaxgrad.common.distributed import initialize_distributed
    from jaxgrad.config import ConfigError
    from jaxgrad.pipeline.finetune import finetune, finetune_selection
    from jaxgrad.pipeline.validate import validate_config
    from jaxgrad.rundir import resolved_config

    initialize_distributed(bool(config.train.distributed))
    # resolved_config: the base model is <workdir>/base when the config pretrains one (demo).
    resolved = resolved_config(config, workdir)
    if bool((config.get("base") or {}).get("pretrain", False)) and not os.path.isdir(
            resolved.model.name_or_path):
        raise ConfigError(f"--workdir={workdir} has no pretrained base "
                          f"({resolved.model.name_or_path}), which this config's base.pretrain "
                          "builds: run scripts/run_pipeline.py --stages=base (or the whole "
                          "pipeline) with this --workdir first")
    data = validate_config(resolved, ["finetune"])  # the typed sections, the data
    finetune_selection(resolved, data)  # config.finetune: the sources, selection or groups file
    print(f"JAX {jax.__version__}, process {jax.process_index()}/{jax.process_count()}, "
          f"devices: {jax.devices()}", flush=True)
    result = finetune(resolved, workdir)
    print(json.dumps({"step": result.step, "metrics": result.metrics}, indent=1, default=float))
    print(f"[jaxgrad] fine-tune in {result.workdir} (adapter/ in PEFT format, metrics.jsonl, "
          "sources.json)", flush=True)


if __name__ == "__main__":
    run_app(main)
