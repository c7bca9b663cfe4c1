"""The GradEx method end to end, one resumable stage at a time.

    base ─► meta_train ─► gradients ─► (groups) ─► estimates ─► selection ─► finetune ─► (fidelity) ─► report

Each stage reads the previous stages' artefacts from the run directory and writes its own; a
stage whose artefact exists is skipped, so a run that was interrupted continues where it stopped
and any stage can be rerun alone by deleting its folder.

Artefacts are reused only under the config they were computed with: each stage has a fingerprint
of the config keys it reads and of the fingerprints of the stages it reads
(:mod:`jaxgrad.pipeline.fingerprint`), recorded in ``<workdir>/stages.json``. A changed fingerprint raises
:class:`ConfigChangedError` (the stage, the run directory, the changed keys) and deletes nothing,
unless ``pipeline.on_config_change = "rerun"`` (``--on_config_change=rerun``): then the changed
stage's artefacts and everything downstream are deleted and recomputed. Layout (see
checkpoints/README.md):

    <workdir>/base/                  tiny base pretrained from scratch (only if config.base.pretrain)
    <workdir>/meta_train/            θ*: LoRA meta-training on all sources (jaxgrad.train.stage)
    <workdir>/gradients/{train,target}/  projected per-sample gradients (jaxgrad.gradients.store)
    <workdir>/groups/groups.json     with groups.by = "cluster": the units selected among, clusters
                                     of samples by their projected gradients (jaxgrad.groups)
    <workdir>/estimates/estimates.csv    one row per sampled subset: sources, estimates, solver status
    <workdir>/selection/selection.json   ensemble scores, intervals, the chosen sources, baselines
    <workdir>/finetune/<name>/       the base model fine-tuned on: selection, all, random, grad_sim,
                                     repr_sim
    <workdir>/fidelity/              with pipeline.fidelity: θ* really fine-tuned on K subsets vs the
                                     estimates (jaxgrad.pipeline.fidelity; fidelity.json)
    <workdir>/report.md, *.png       what ran, the selection and the target metrics side by side
    <workdir>/stages.json            per stage: config fingerprint, the values behind it, complete

The package: :mod:`~jaxgrad.pipeline.run` (the stages in order), :mod:`~jaxgrad.pipeline.validate`
(checks before the first stage), :mod:`~jaxgrad.pipeline.fingerprint` (what each stage's result
depends on) and :mod:`~jaxgrad.pipeline.records` (``stages.json``, reuse decisions), the stages
after the method's steps: :mod:`~jaxgrad.pipeline.finetune`, :mod:`~jaxgrad.pipeline.fidelity`
(with :mod:`~jaxgrad.pipeline.fidelity_truth`), :mod:`~jaxgrad.pipeline.report` (with
:mod:`~jaxgrad.pipeline.plots`); and the scripts' entry points :mod:`~jaxgrad.pipeline.cli`,
:mod:`~jaxgrad.pipeline.runtime`.

Library functions receive the ml_collections config (the stage boundary) and turn its sections
into typed values before calling the jitted core.
"""

from __future__ import annotations

from jaxgrad._compat import moved_names
from jaxgrad.pipeline.fingerprint import ConfigChangedError
from jaxgrad.pipeline.cli import define_on_config_change_flag, stage_script
from jaxgrad.pipeline.fidelity import fidelity_enabled, stage_fidelity
from jaxgrad.pipeline.finetune import stage_finetune
from jaxgrad.pipeline.report import stage_report
from jaxgrad.pipeline.run import STAGES, run_pipeline
from jaxgrad.pipeline.validate import (DATA_STAGES, FRACTION_OR_COUNT, check_data_splits,
                                       check_method_sections, data_splits_record,
                                       known_config_keys, validate_config)

__all__ = [
    "DATA_STAGES",
    "FRACTION_OR_COUNT",
    "STAGES",
    "ConfigChangedError",
    "check_data_splits",
    "check_method_sections",
    "data_splits_record",
    "define_on_config_change_flag",
    "fidelity_enabled",
    "known_config_keys",
    "run_pipeline",
    "stage_fidelity",
    "stage_finetune",
    "stage_report",
    "stage_script",
    "validate_config",
]

__getattr__ = moved_names(__name__)  # names that moved out of jaxgrad.pipeline (jaxgrad._compat)
