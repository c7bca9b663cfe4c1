"""The report's "Next" section: the command that fine-tunes the base model on the selection
(``scripts/finetune.py`` with this run's config and overrides), named so that it neither
duplicates the table's ``selection`` run nor pins a step count into its name."""

from __future__ import annotations

import os
import shlex
import sys

from jaxgrad import rundir
from jaxgrad.pipeline.runtime import python_command


def next_steps_lines(config, workdir: str, selection: dict,
                     argv: list[str] | None = None) -> list[str]:
    """The command that fine-tunes the base model on the selection: this run's ``--config`` and
    every ``--config.*`` override of its command line (``argv``, default ``sys.argv``; the
    ``finetune`` section is set by the command itself, and ``pipeline.*`` means nothing to it),
    for the full ``train.num_steps`` as the run ``selection_full``; when the table's
    ``selection`` run already had that budget (``pipeline.finetune_steps`` 0 or equal), the
    command names that run (with ``pipeline.finetune_seed`` as the seeds) and returns it as
    recorded instead of training a duplicate."""
    argv = sys.argv if argv is None else argv
    config_file = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")),
                       "<your config>")
    overrides = [a for a in argv if a.startswith("--config.")  # finetune.py sets finetune.*
                 and not a.startswith(("--config.finetune.", "--config.pipeline."))]
    sel = os.path.join(workdir, rundir.SELECTION_FILE)
    parts = [f"{shlex.quote(python_command())} scripts/finetune.py",
             f"--config={shlex.quote(config_file)}",
             f"--workdir={shlex.quote(workdir)}", *map(shlex.quote, overrides),
             f"--config.finetune.selection_file={shlex.quote(sel)}"]
    if selection.get("groups"):
        parts.append("--config.finetune.groups_file="
                     + shlex.quote(os.path.join(workdir, rundir.GROUPS_FILE)))
    n = len(selection["selected"])
    what = ("unit" if selection.get("groups") else "source") + ("" if n == 1 else "s")
    steps = int((config.get("pipeline") or {}).get("finetune_steps", 0) or 0)
    total = config.train.get("num_steps", 0)
    budget = f"{total} steps" if total else f"{config.train.get('epochs', 1)} epoch(s)"
    if steps > 0 and steps != total:
        parts.append("--config.finetune.name=selection_full")
        note = (f"The table's `selection` run trained on them for `pipeline.finetune_steps` = "
                f"{steps} steps, the budget every compared run got; this trains for "
                f"`train.num_steps`, {budget}, into `{workdir}/finetune/selection_full/` (with "
                "other `--config.train.*` settings, such as `--config.train.num_steps=...`, give "
                "it another `--config.finetune.name`).")
    else:
        parts.append("--config.finetune.name=selection")
        seed = int((config.get("pipeline") or {}).get("finetune_seed", -1))
        if seed >= 0:  # the table's runs use pipeline.finetune_seed
            parts += [f"--config.train.seed={seed}", f"--config.lora.seed={seed}"]
        note = ("The table's `selection` run is this fine-tune (same settings), so the command "
                f"returns it as recorded (its adapter: `{workdir}/finetune/selection/adapter/`); "
                "with other `--config.train.*` settings, give it another "
                "`--config.finetune.name`.")
    return ["## Next", "", f"Fine-tune the base model on the {n} selected {what}. {note}", "",
            "    " + " ".join(parts), ""]
