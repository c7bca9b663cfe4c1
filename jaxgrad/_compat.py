"""The import paths of jaxgrad 0.1 that the package layout moved (issue 17), kept working.

Code written against the flat layout (``from jaxgrad.projection import Projector``,
``from jaxgrad.config_sections import default_config``, ``jaxgrad.train.load_data``, ``jaxgrad.losses``) still runs:
each old path gives the object from its new home, with a ``DeprecationWarning`` that names the
new one. Modules that no longer exist are served by a finder on ``sys.meta_path`` (installed by
``import jaxgrad``, consulted only after the regular finders found nothing); modules that still
exist but lost names forward them through a module ``__getattr__`` (:func:`moved_names`, PEP 562).
jaxgrad itself never imports an old path (``tests/repo/test_layout.py`` checks its imports;
``tests/test_compat.py`` checks every entry and that its warning names the user's line).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable
from typing import Any

# old module -> {old public name: "new.module" (same name) or "new.module:new_name"}. Besides
# jaxgrad 0.1's paths, the few that issue 17's own steps introduced and later moved again
# (jaxgrad.records, jaxgrad.plots, jaxgrad.train.final_finetune): code written against them in
# between keeps running too.
MOVED: dict[str, dict[str, str]] = {
    "jaxgrad.checkpoint": {
        "ITEMS": "jaxgrad.train.checkpoint",
        "TRAINABLE_FILTERS": "jaxgrad.models.lora",
        "abstract_like": "jaxgrad.train.checkpoint",
        "jsonable": "jaxgrad.common.jsonio",
        "make_manager": "jaxgrad.train.checkpoint",
        "read_meta": "jaxgrad.train.checkpoint",
        "resolve_step": "jaxgrad.train.checkpoint",
        "restore": "jaxgrad.train.checkpoint",
        "restore_params": "jaxgrad.train.checkpoint",
        "save": "jaxgrad.train.checkpoint",
    },
    "jaxgrad.choices": {
        "MAX_CHOICES": "jaxgrad.train.evaluate",
        "answer_choices": "jaxgrad.train.evaluate",
        "choice_accuracy": "jaxgrad.train.evaluate",
        "choice_log_likelihoods": "jaxgrad.train.evaluate",
        "target_choices": "jaxgrad.train.evaluate",
    },
    "jaxgrad.config_sections": {
        "LORA_PEFT_ONLY": "jaxgrad.config",
        "add_method_sections": "jaxgrad.config",
        "add_model_sections": "jaxgrad.config",
        "add_train_sections": "jaxgrad.config",
        "default_config": "jaxgrad.config",
        "files_section": "jaxgrad.config",
    },
    "jaxgrad.counts": {
        "RULE": "jaxgrad.common.counts",
        "SETTINGS": "jaxgrad.common.counts",
        "canonical": "jaxgrad.common.counts",
        "check_fraction_or_count": "jaxgrad.common.counts",
        "fraction_or_count": "jaxgrad.common.counts",
    },
    "jaxgrad.data.batching": {
        "encode_for_model": "jaxgrad.models.forward",
        "model_layout": "jaxgrad.models.forward",
    },
    "jaxgrad.data.sources": {
        "ALPACA_PROMPT_NO_INPUT": "jaxgrad.data.examples",
        "ALPACA_PROMPT_WITH_INPUT": "jaxgrad.data.examples",
        "ANSWER_FORMATS": "jaxgrad.data.examples",
        "ANSWER_MARKER": "jaxgrad.data.examples",
        "COLUMN_ROLES": "jaxgrad.config",
        "COT_COMPLETION": "jaxgrad.data.examples",
        "COT_PROMPT": "jaxgrad.data.examples",
        "DEFAULT_COLUMNS": "jaxgrad.config",
        "FILE_TYPES": "jaxgrad.data.readers",
        "FORMATS": "jaxgrad.config",
        "MultiSourceData": "jaxgrad.data.multisource",
        "SPLITS": "jaxgrad.data.examples",
        "example_id": "jaxgrad.data.examples",
        "extract_cot_answer": "jaxgrad.data.examples",
        "extract_full_answer": "jaxgrad.data.examples",
        "extract_leading_answer": "jaxgrad.data.examples",
        "extract_marker_answer": "jaxgrad.data.examples",
        "json_loads": "jaxgrad.data.readers",
        "json_text": "jaxgrad.data.readers",
        "make_examples": "jaxgrad.data.examples",
        "read_text": "jaxgrad.data.readers",
        "seed_for": "jaxgrad.data.examples",
    },
    "jaxgrad.fidelity": {
        "FIRST_ORDER_SCALES": "jaxgrad.pipeline.fidelity",
        "FidelityConfig": "jaxgrad.config",
        "OPTIMIZERS": "jaxgrad.config",
        "ONE_BATCH_SHORTCUT": "jaxgrad.pipeline.fidelity_truth",
        "first_order_error": "jaxgrad.pipeline.fidelity",
        "run_fidelity": "jaxgrad.pipeline.fidelity",
        "suggest_scale": "jaxgrad.pipeline.fidelity",
    },
    "jaxgrad.fingerprint": {
        "ConfigChangedError": "jaxgrad.pipeline.fingerprint",
        "DERIVED": "jaxgrad.pipeline.records",
        "FINGERPRINT_EXCLUDE": "jaxgrad.pipeline.fingerprint",
        "HASHES_FILE": "jaxgrad.rundir",
        "INERT_DEFAULTS": "jaxgrad.pipeline.fingerprint",
        "MODES": "jaxgrad.config:CONFIG_CHANGE_MODES",
        "RECORDS_FILE": "jaxgrad.rundir",
        "RECORDS_VERSION": "jaxgrad.pipeline.fingerprint",
        "REGENERATED": "jaxgrad.pipeline.records",
        "RUN_FILE": "jaxgrad.rundir",
        "RUN_SECTIONS": "jaxgrad.pipeline.finetune",
        "STAGE_ARTEFACTS": "jaxgrad.rundir",
        "STAGE_CONFIG": "jaxgrad.pipeline.fingerprint",
        "STAGE_INPUTS": "jaxgrad.pipeline.fingerprint",
        "STAGE_ORDER": "jaxgrad.pipeline.fingerprint",
        "StageFingerprint": "jaxgrad.pipeline.fingerprint",
        "artefacts_exist": "jaxgrad.pipeline.records",
        "check_finetune_run": "jaxgrad.pipeline.finetune",
        "config_changes": "jaxgrad.pipeline.fingerprint",
        "delete_artefacts": "jaxgrad.pipeline.records",
        "downstream": "jaxgrad.pipeline.records",
        "finetune_run_values": "jaxgrad.pipeline.finetune",
        "flatten_config": "jaxgrad.pipeline.fingerprint",
        "make_record": "jaxgrad.pipeline.records",
        "model_input_digests": "jaxgrad.pipeline.fingerprint",
        "read_records": "jaxgrad.pipeline.records",
        "reconcile": "jaxgrad.pipeline.records",
        "records_path": "jaxgrad.pipeline.records",
        "stage_fingerprints": "jaxgrad.pipeline.fingerprint",
        "write_records": "jaxgrad.pipeline.records",
    },
    "jaxgrad.flat": {
        "FlatSpec": "jaxgrad.common.flat",
        "as_numpy_tree": "jaxgrad.common.flat",
        "flat_spec": "jaxgrad.common.flat",
        "flatten": "jaxgrad.common.flat",
        "tree_norm": "jaxgrad.common.flat",
        "unflatten": "jaxgrad.common.flat",
    },
    "jaxgrad.gradients": {
        "params_fingerprint": "jaxgrad.gradients.compute",
        "projector_identity": "jaxgrad.gradients.compute",
        "store_model_id": "jaxgrad.gradients.compute",
    },
    "jaxgrad.gradients.per_sample": {
        "trainable_filter": "jaxgrad.models.lora",
    },
    "jaxgrad.groups": {
        "AGGLOMERATIVE_MAX_SAMPLES": "jaxgrad.groups.units",
        "CLUSTER_PREFIX": "jaxgrad.groups.units",
        "GROUPS_FILE": "jaxgrad.rundir",
        "GROUP_BY": "jaxgrad.config",
        "GroupsSpec": "jaxgrad.groups.units",
        "METHODS": "jaxgrad.config:GROUP_METHODS",
        "METRICS": "jaxgrad.config:GROUP_METRICS",
        "Units": "jaxgrad.groups.units",
        "cluster_names": "jaxgrad.groups.units",
        "make_groups": "jaxgrad.groups.units",
    },
    "jaxgrad.losses": {
        "Batch": "jaxgrad.models.forward",
        "DECODER_FIELDS": "jaxgrad.models.forward",
        "ENCODER_DECODER_FIELDS": "jaxgrad.models.forward",
        "batch_loss": "jaxgrad.train.losses",
        "batch_token_count": "jaxgrad.train.losses",
        "model_logits": "jaxgrad.models.forward",
        "token_ce_sums": "jaxgrad.train.losses",
        "token_cross_entropy": "jaxgrad.train.losses",
    },
    "jaxgrad.models.gemma3": {
        "check_refused_fields": "jaxgrad.models.hf_config",
        "refuse": "jaxgrad.models.hf_config",
    },
    "jaxgrad.models.gguf": {
        "file_digest": "jaxgrad.common.digest:file_sha256",
    },
    "jaxgrad.models.gpt2": {
        "check_refused_fields": "jaxgrad.models.hf_config",
        "refuse": "jaxgrad.models.hf_config",
    },
    "jaxgrad.models.gpt_neox": {
        "check_refused_fields": "jaxgrad.models.hf_config",
        "refuse": "jaxgrad.models.hf_config",
    },
    "jaxgrad.models.llama": {
        "ACTIVATIONS": "jaxgrad.models.hf_config",
        "COMPUTED": "jaxgrad.models.hf_config",
        "DTYPES": "jaxgrad.models.hf_config",
        "GENERIC_EXTRAS": "jaxgrad.models.hf_config",
        "GENERIC_FIELDS": "jaxgrad.models.hf_config",
        "INERT": "jaxgrad.models.hf_config",
        "NOT_APPLIED": "jaxgrad.models.hf_config",
        "REFUSED": "jaxgrad.models.hf_config",
        "ROPE_TYPES": "jaxgrad.models.rope",
        "RULES": "jaxgrad.models.hf_config",
        "apply_rope": "jaxgrad.models.rope",
        "check_refused_fields": "jaxgrad.models.hf_config",
        "refuse": "jaxgrad.models.hf_config",
        "resolve_dtype": "jaxgrad.models.hf_config",
        "rope_frequencies": "jaxgrad.models.rope",
        "rope_inv_freq": "jaxgrad.models.rope",
    },
    "jaxgrad.models.lora": {
        "PEFT_PREFIX": "jaxgrad.models.peft",
        "PeftBaseTensors": "jaxgrad.models.peft",
        "adapter_tensors": "jaxgrad.models.peft",
        "load_peft_adapter": "jaxgrad.models.peft",
        "lora_config_of": "jaxgrad.models.peft",
        "read_peft_config": "jaxgrad.models.peft",
        "save_peft_adapter": "jaxgrad.models.peft",
    },
    "jaxgrad.outputs": {
        "OUTPUT_FUNCTIONS": "jaxgrad.config",
        "OutputFn": "jaxgrad.gradients.outputs",
        "get_output_fn": "jaxgrad.gradients.outputs",
        "logit_odds": "jaxgrad.gradients.outputs",
        "outputs_loss": "jaxgrad.gradients.outputs",
        "token_ce": "jaxgrad.gradients.outputs",
    },
    "jaxgrad.per_sample": {
        "GROUP_ENTRIES": "jaxgrad.gradients.per_sample",
        "MODEL_INPUTS": "jaxgrad.models.forward",
        "PerSampleResult": "jaxgrad.gradients.per_sample",
        "num_trainable": "jaxgrad.gradients.per_sample",
        "per_sample_projected_grads": "jaxgrad.gradients.per_sample",
        "trainable_filter": "jaxgrad.models.lora",
    },
    "jaxgrad.pipeline": {
        "BAD_KINDS": "jaxgrad.select.stage",
        "ESTIMATE_FIELDS": "jaxgrad.estimate.stage",
        "FINETUNE_RUNS": "jaxgrad.config",
        "SELECTION_METHODS": "jaxgrad.config",
        "SELECTION_METRICS": "jaxgrad.config",
        "SPLITS_FILE": "jaxgrad.rundir",
        "SURROGATE_MODES": "jaxgrad.config",
        "SurrogateScorer": "jaxgrad.estimate.scorer",
        "global_data_mesh": "jaxgrad.common.sharding",
        "groups_enabled": "jaxgrad.groups.stage",
        "local_data_mesh": "jaxgrad.common.sharding",
        "pipeline_units": "jaxgrad.groups.stage",
        "ranking_auc": "jaxgrad.select.stage",
        "representation_similarity": "jaxgrad.select.stage",
        "resolved_config": "jaxgrad.rundir",
        "selection_metric": "jaxgrad.select.stage",
        "stage_base": "jaxgrad.train.stage",
        "stage_estimates": "jaxgrad.estimate.stage",
        "stage_gradients": "jaxgrad.gradients.stage",
        "stage_groups": "jaxgrad.groups.stage",
        "stage_meta_train": "jaxgrad.train.stage",
        "stage_selection": "jaxgrad.select.stage",
        "subset_sources": "jaxgrad.estimate.stage",
    },
    "jaxgrad.pipeline.report": {
        "next_steps_lines": "jaxgrad.pipeline.next_step",
    },
    "jaxgrad.plots": {
        "KIND_COLORS": "jaxgrad.pipeline.plots",
        "plot_clusters": "jaxgrad.pipeline.plots",
        "plot_fidelity": "jaxgrad.pipeline.plots",
        "plot_scores": "jaxgrad.pipeline.plots",
    },
    "jaxgrad.progress": {
        "LOG_INTERVAL_S": "jaxgrad.common.progress",
        "progress_bar": "jaxgrad.common.progress",
    },
    "jaxgrad.projection": {
        "Projector": "jaxgrad.gradients.projection",
    },
    "jaxgrad.records": {
        "DERIVED": "jaxgrad.pipeline.records",
        "REGENERATED": "jaxgrad.pipeline.records",
        "artefacts_exist": "jaxgrad.pipeline.records",
        "delete_artefacts": "jaxgrad.pipeline.records",
        "downstream": "jaxgrad.pipeline.records",
        "make_record": "jaxgrad.pipeline.records",
        "read_records": "jaxgrad.pipeline.records",
        "reconcile": "jaxgrad.pipeline.records",
        "records_path": "jaxgrad.pipeline.records",
        "write_records": "jaxgrad.pipeline.records",
    },
    "jaxgrad.report": {
        "KIND_COLORS": "jaxgrad.pipeline.plots",
        "RUN_ORDER": "jaxgrad.config:FINETUNE_RUNS",
        "cluster_lines": "jaxgrad.pipeline.report",
        "compare_tables": "jaxgrad.pipeline.report",
        "estimated_quantity": "jaxgrad.pipeline.report",
        "fidelity_lines": "jaxgrad.pipeline.report",
        "markdown_tables": "jaxgrad.pipeline.report",
        "next_steps_lines": "jaxgrad.pipeline.next_step",
        "plot_clusters": "jaxgrad.pipeline.plots",
        "plot_fidelity": "jaxgrad.pipeline.plots",
        "plot_scores": "jaxgrad.pipeline.plots",
        "significance_line": "jaxgrad.pipeline.report",
        "target_metrics": "jaxgrad.pipeline.report",
        "theta_star_lines": "jaxgrad.pipeline.report",
        "write_report": "jaxgrad.pipeline.report",
    },
    "jaxgrad.representations": {
        "last_hidden_states": "jaxgrad.models.forward",
        "mean_representations": "jaxgrad.select.representations",
    },
    "jaxgrad.runtime": {
        "DEFAULT_DIR": "jaxgrad.pipeline.runtime",
        "ENV": "jaxgrad.pipeline.runtime",
        "OFF": "jaxgrad.pipeline.runtime",
        "enable_compilation_cache": "jaxgrad.pipeline.runtime",
        "make_configs_importable": "jaxgrad.common.checkout",
        "python_command": "jaxgrad.pipeline.runtime",
        "resume_hint_on_interrupt": "jaxgrad.pipeline.runtime",
    },
    "jaxgrad.selection": {
        "CLUSTER_METHODS": "jaxgrad.config:GROUP_METHODS",
        "EnsembleScores": "jaxgrad.select.scores",
        "ScoreFn": "jaxgrad.select.stepwise",
        "StepwiseResult": "jaxgrad.select.stepwise",
        "baseline_all": "jaxgrad.select.baselines",
        "baseline_random": "jaxgrad.select.baselines",
        "baseline_random_total": "jaxgrad.select.baselines",
        "cluster_samples": "jaxgrad.groups.clusters",
        "ensemble_scores": "jaxgrad.select.scores",
        "forward_selection": "jaxgrad.select.stepwise",
        "gradient_similarity_scores": "jaxgrad.select.baselines",
        "masks_from_sources": "jaxgrad.estimate.subsets",
        "ordered_selection": "jaxgrad.select.stepwise",
        "sample_subsets": "jaxgrad.estimate.subsets",
        "select_threshold": "jaxgrad.select.scores",
        "select_top": "jaxgrad.select.scores",
        "subset_size": "jaxgrad.estimate.subsets",
    },
    "jaxgrad.sharding": {
        "AXIS_NAMES": "jaxgrad.common.sharding",
        "DATA_AXIS": "jaxgrad.common.sharding",
        "DEFAULT_RULES": "jaxgrad.common.sharding",
        "MODEL_AXIS": "jaxgrad.common.sharding",
        "Rules": "jaxgrad.common.sharding",
        "batch_sharding": "jaxgrad.common.sharding",
        "from_host": "jaxgrad.common.sharding",
        "make_mesh": "jaxgrad.common.sharding",
        "partition_specs": "jaxgrad.common.sharding",
        "path_name": "jaxgrad.common.sharding",
        "replicated": "jaxgrad.common.sharding",
        "rules_from_config": "jaxgrad.common.sharding",
        "shard_batch": "jaxgrad.common.sharding",
        "spec_for": "jaxgrad.common.sharding",
        "state_shardings": "jaxgrad.common.sharding",
    },
    "jaxgrad.store": {
        "FORMAT_VERSION": "jaxgrad.gradients.manifest",
        "GradientStore": "jaxgrad.gradients.store",
        "IncompleteStoreError": "jaxgrad.gradients.manifest",
        "MANIFEST_NAME": "jaxgrad.rundir:MANIFEST_FILE",
        "STORAGE_DTYPES": "jaxgrad.config",
        "StoreMismatchError": "jaxgrad.gradients.manifest",
        "read_manifest": "jaxgrad.gradients.manifest",
    },
    "jaxgrad.surrogate": {
        "GRADEX_POSITIVE_RATE": "jaxgrad.estimate.surrogate",
        "HIGHER_IS_BETTER": "jaxgrad.estimate.lift",
        "OBJECTIVES": "jaxgrad.config",
        "OUTPUTS": "jaxgrad.config:OUTPUT_FUNCTIONS",
        "PRECONDITIONERS": "jaxgrad.estimate.surrogate",
        "SubsetFits": "jaxgrad.estimate.solver",
        "estimate_subsets": "jaxgrad.estimate.lift",
        "exact_estimates": "jaxgrad.estimate.lift",
        "fit_subsets": "jaxgrad.estimate.surrogate",
        "gradex_labels": "jaxgrad.estimate.surrogate",
        "lift_updates": "jaxgrad.estimate.lift",
        "rescale_factors": "jaxgrad.estimate.lift",
    },
    "jaxgrad.train": {
        "ADAPTER_DIR": "jaxgrad.rundir",
        "CKPT_DIR": "jaxgrad.rundir",
        "METRICS_FILE": "jaxgrad.rundir",
        "MeshConfig": "jaxgrad.config",
        "ModelSpec": "jaxgrad.config",
        "OPTIMIZERS": "jaxgrad.config",
        "SCHEDULES": "jaxgrad.config",
        "TrainConfig": "jaxgrad.config",
        "finetune": "jaxgrad.pipeline.finetune",
        "finetune_run_name": "jaxgrad.pipeline.finetune",
        "finetune_sources": "jaxgrad.pipeline.finetune",
        "initialize_distributed": "jaxgrad.common.distributed",
        "load_data": "jaxgrad.data.sources",
        "load_model": "jaxgrad.models.loading",
        "lora_from_config": "jaxgrad.models.loading",
        "meta_train": "jaxgrad.train.stage",
        "split_trainable": "jaxgrad.models.lora",
    },
    "jaxgrad.train.final_finetune": {
        "finetune": "jaxgrad.pipeline.finetune",
        "finetune_run_name": "jaxgrad.pipeline.finetune",
        "finetune_sources": "jaxgrad.pipeline.finetune",
    },
}


def new_home(old_module: str, name: str) -> tuple[str, str] | None:
    """``(module, name)`` where ``old_module.name`` lives now, or None if it did not move."""
    target = MOVED.get(old_module, {}).get(name)
    if target is None:
        return None
    module, _, new_name = target.partition(":")
    return module, new_name or name


def _resolve(old_module: str, name: str, stacklevel: int) -> Any:
    home = new_home(old_module, name)
    if home is None:
        raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
    module, new_name = home
    warnings.warn(f"{old_module}.{name} moved to {module}.{new_name}; import it from there "
                  "(the old path will be removed)", DeprecationWarning, stacklevel=stacklevel)
    return getattr(importlib.import_module(module), new_name)


def moved_names(module_name: str, stacklevel: int = 3) -> Callable[[str], Any]:
    """A module ``__getattr__`` that serves the names :data:`MOVED` lists for ``module_name``.

    ``stacklevel`` makes the DeprecationWarning point at the user's line (Python shows one
    by default only there): 3 when this is the module's ``__getattr__`` itself, 4 when another
    ``__getattr__`` calls it (:func:`jaxgrad.common.lazy.lazy_exports`' fallback)."""
    def __getattr__(name: str) -> Any:
        return _resolve(module_name, name, stacklevel=stacklevel)
    return __getattr__


class _MovedModuleLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module) -> None:
        homes = sorted({t.partition(":")[0] for t in MOVED[module.__name__].values()})
        warnings.warn(f"{module.__name__} moved (to {', '.join(homes)}); import from the new "
                      "modules (the old path will be removed)", DeprecationWarning, stacklevel=2)
        module.__getattr__ = moved_names(module.__name__)
        module.__all__ = sorted(MOVED[module.__name__])


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the modules of :data:`MOVED` that no longer exist (it runs after the path finder)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _MovedModuleLoader())


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once), after the regular finders."""
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
