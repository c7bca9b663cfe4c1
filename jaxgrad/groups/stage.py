"""Step 2b as a pipeline stage (optional, ``groups.by = "cluster"``): clusters of train samples by
their projected gradients, recorded in ``<workdir>/groups/groups.json``; and the units every later
stage selects among (:func:`pipeline_units`: the data's sources, or that record's clusters)."""

from __future__ import annotations

import os
import time
from typing import Sequence

from jaxgrad import rundir
from jaxgrad.common.jsonio import read_json, write_shared_json
from jaxgrad.data.sources import load_data
from jaxgrad.gradients.store import GradientStore
from jaxgrad.groups.units import GroupsSpec, Units, make_groups


def groups_enabled(config) -> bool:
    """Whether the optional groups stage runs (``groups.by = "cluster"``)."""
    return GroupsSpec.from_config(config.get("groups")).clustered


def stage_groups(config, workdir: str) -> dict | None:
    """Optional (``groups.by = "cluster"``): clusters of train samples by their projected gradients,
    the units every later stage selects among (:mod:`jaxgrad.groups`); ``groups/groups.json``."""

    spec = GroupsSpec.from_config(config.get("groups"))
    if not spec.clustered:
        return None
    out = os.path.join(workdir, rundir.GROUPS_FILE)
    if not os.path.isfile(out):
        train = GradientStore.open(rundir.gradients_dir(workdir, "train"))
        t0 = time.time()
        data = load_data(config.data)
        record = make_groups(spec, train.feats(), train.example_ids, train.source_ids,
                             data.sources)
        record["seconds"] = round(time.time() - t0, 3)
        prompts = {e["example_id"]: e["prompt"] for e in data.examples("train")}
        for u in record["units"]:  # for the report: what a unit holds, at a glance
            u["example_prompts"] = [prompts[e][:300] for e in u["example_ids"][:3]]
        os.makedirs(os.path.dirname(out), exist_ok=True)
        write_shared_json(out, record, "groups")  # every process computed the same record
    record = read_json(out)
    return {"units": len(record["units"]), "sizes": [u["size"] for u in record["units"]]}


def pipeline_units(config, workdir: str, sources: Sequence[str] | None = None):
    """The units the estimates, selection and fine-tunes choose among (:class:`jaxgrad.groups.Units`):
    the data's sources, or with ``groups.by = "cluster"`` the groups stage's record."""
    if GroupsSpec.from_config(config.get("groups")).clustered:
        path = os.path.join(workdir, rundir.GROUPS_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"groups.by = 'cluster' but {path} does not exist: run the "
                                    "groups stage first (--stages=groups)")
        return Units.from_file(path)
    return Units.of_sources(list(dict.fromkeys(sources if sources is not None
                                               else _data_sources(config))))


def _data_sources(config) -> list[str]:
    return load_data(config.data).sources
