"""Every config section with its documented default; ``configs/*.py`` start from
:func:`default_config` and override what differs (paper settings, the demo's tuning).

Sections: ``model``, ``lora``, ``data`` (what is trained), ``train``, ``mesh``, ``finetune`` (how),
and the GradEx method's ``base``, ``gradients``, ``surrogate``, ``selection``, ``pipeline``,
``fidelity``. Method defaults follow the paper's code: logit-odds outputs, a Rademacher
projection, the gradex surrogate objective with C = 1e-4, the update rescaled to ``scale`` times
the LoRA norm, 1000 random subsets of half the sources, random-ensemble scores.

Every default is declared once. A section that a dataclass reads is built from that dataclass's
field defaults, and each field's meaning is documented there: ``model``
(:class:`jaxgrad.train.ModelSpec`), ``lora`` (:class:`jaxgrad.models.lora.LoraConfig`), ``train``
(:class:`jaxgrad.train.TrainConfig`), ``mesh`` (:class:`jaxgrad.train.MeshConfig`) and ``groups``
(:class:`jaxgrad.groups.GroupsSpec`); the ``gradients`` keys that
:func:`jaxgrad.gradients.compute_gradient_store` takes are its keyword defaults. Every other key
is declared here, its meaning in a comment. So is ``fidelity``: its dataclass,
:class:`jaxgrad.fidelity.FidelityConfig`, takes its defaults from :func:`fidelity_section`, since
importing jaxgrad.fidelity here would close an import cycle (it imports jaxgrad.pipeline, which
imports this module).
"""

import dataclasses
import inspect
from typing import Sequence

import ml_collections

from jaxgrad.data.sources import COLUMN_ROLES, SourcesSpec
from jaxgrad.gradients import compute_gradient_store
from jaxgrad.groups import GroupsSpec
from jaxgrad.models.lora import LoraConfig
from jaxgrad.train import MeshConfig, ModelSpec, TrainConfig

# LoraConfig's PEFT fields that no config declares (a config may set them: known_config_keys).
LORA_PEFT_ONLY = ("target_regex", "exclude_modules", "exclude_regex", "layers_to_transform",
                  "layers_pattern", "rank_pattern", "alpha_pattern", "use_rslora")


def default_config() -> ml_collections.ConfigDict:
    """All sections with their defaults (a from-scratch tiny Llama on the synthetic tasks)."""
    c = ml_collections.ConfigDict()
    add_model_sections(c)
    add_train_sections(c)
    add_method_sections(c)
    return c


def _section(cls: type, exclude: Sequence[str] = (),
             **config_spelling) -> ml_collections.ConfigDict:
    """The field defaults of the dataclass ``cls`` (but ``exclude``), in field order, as a config
    section; ``config_spelling`` gives a default as a config holds it (``""`` for None: a command
    line can then set a string)."""
    fields = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
              for f in dataclasses.fields(cls) if f.name not in exclude}
    assert set(config_spelling) <= set(fields), (cls.__name__, sorted(config_spelling))
    return ml_collections.ConfigDict({**fields, **config_spelling})


def _keyword_defaults(fn) -> dict:
    """``{name: default}`` of the parameters of ``fn`` that have a default."""
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.default is not p.empty}


def add_model_sections(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``model``, ``lora`` and ``data``."""
    c.model = _section(ModelSpec)  # the fields of jaxgrad.train.ModelSpec
    # The fields of jaxgrad.models.lora.LoraConfig but its PEFT ones, as a config spells them:
    # rank 0 = no adapters (set train.full_finetune); target_modules "a,b", "" = the family's
    # default (None).
    c.lora = _section(LoraConfig, exclude=LORA_PEFT_ONLY, target_modules="")

    c.data = ml_collections.ConfigDict()
    c.data.kind = "synthetic"  # "synthetic" (embedded tasks, data.synthetic) | "files" (data.files)
    c.data.synthetic = {}  # SyntheticSpec fields (jaxgrad/data/synthetic.py); {} = its defaults
    c.data.files = {}  # SourcesSpec fields (jaxgrad/data/sources.py) when kind = "files"
    return c


def files_section(**fields) -> ml_collections.ConfigDict:
    """``data.files`` (SourcesSpec fields) with ``validation`` / ``test`` held as floats and
    ``columns`` holding every role (``""``: the format's default column).

    ml_collections fixes a field's type from its first value, so a count written as ``100`` in a
    config file would refuse ``--config.data.files.validation=0.1`` on the command line. Held as
    floats, both a fraction and a count can be given (``100.0`` is the count 100:
    :mod:`jaxgrad.counts`; the config fingerprints treat ``100`` and ``100.0`` alike).
    """
    fields = {"validation": SourcesSpec.validation, "test": SourcesSpec.test, **fields}
    # Every column role of every format, "" = the format's default column, so that any of them
    # can be set on the command line (--config.data.files.columns.source=task): ml_collections
    # refuses keys a config does not hold.
    fields["columns"] = {**{role: "" for role in COLUMN_ROLES}, **dict(fields.get("columns") or {})}
    for key in ("validation", "test"):
        value = fields[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            fields[key] = float(value)
    return ml_collections.ConfigDict(fields)


def add_train_sections(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``train`` (optimizer, schedule, evaluation, checkpoints), ``mesh`` and ``finetune``."""
    c.train = _section(TrainConfig, exclude=("mesh",))  # the fields of jaxgrad.train.TrainConfig
    c.mesh = _section(MeshConfig)  # the fields of jaxgrad.train.MeshConfig

    c.finetune = ml_collections.ConfigDict()
    # Sources to fine-tune the base model on: "a,b", or a JSON list '["a,b", "c++"]' for names
    # holding commas.
    c.finetune.sources = ""
    # Or a file naming them: selection/selection.json (its "selected" list), a JSON list,
    # {"sources": [...]}, or one name per line.
    c.finetune.selection_file = ""
    c.finetune.name = ""  # run name under finetune/ ("" = train.finetune_run_name(sources))
    # Names in finetune.sources are units of a groups record (<workdir>/groups/groups.json:
    # clusters such as c03, and unclustered sources): trains on their samples. "" = sources.
    c.finetune.groups_file = ""
    return c


def add_method_sections(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``base``, ``gradients``, ``groups``, ``surrogate``, ``selection``, ``pipeline`` and
    ``fidelity``."""
    c.base = ml_collections.ConfigDict()
    c.base.pretrain = False  # build a tiny base from scratch on generic text (demo only)
    c.base.steps = 400  # full-parameter pretraining steps
    c.base.learning_rate = 3e-3  # pretraining peak learning rate
    c.base.num_texts = 4000  # generic_text lines (belong to none of the sources)
    c.base.seed = 0  # initialisation and text seed

    c.gradients = ml_collections.ConfigDict()
    c.gradients.projection_dim = 8192  # k: numbers stored per sample
    c.gradients.projection_kind = "rademacher"  # "rademacher" (±1/sqrt(k)) | "gaussian"
    c.gradients.projection_seed = 0  # seed of P (same P on every device and chunking)
    # The keys jaxgrad.gradients.compute_gradient_store takes: its keyword defaults.
    store = _keyword_defaults(compute_gradient_store)
    c.gradients.output_fn = store["output_fn"]  # f_i: "logit_odds" (paper) | "token_ce"
    c.gradients.eps = store["eps"]  # probability clipping of logit_odds
    c.gradients.batch_size = store["batch_size"]  # examples per jitted call
    # Examples per vmap chunk (memory: chunk x D gradients).
    c.gradients.chunk_size = store["chunk_size"]
    c.gradients.shard_size = store["shard_size"]  # rows per store shard (the unit of resume)
    c.gradients.dtype = store["dtype"]  # storage: "float32" | "float16" | "bfloat16"

    c.surrogate = ml_collections.ConfigDict()
    c.surrogate.objective = "gradex"  # "gradex" (paper) | "one_class" | "taylor"
    c.surrogate.C = 1e-4  # inverse L2 strength (scikit-learn's C)
    c.surrogate.scale = 0.1  # ||Delta|| / ||theta*_LoRA||; <= 0: unscaled
    c.surrogate.mode = "linearized"  # "linearized" (no forward pass) | "exact" (forward per subset)
    c.surrogate.num_subsets = 1000  # m random subsets
    c.surrogate.subset_size = 0.5  # fraction (or count) of sources per subset
    c.surrogate.seed = 0  # subset sampling and gradex labels
    c.surrogate.chunk_subsets = 250  # subsets per fit call / table flush
    c.surrogate.exact_chunk = 8  # subsets per vmapped forward in exact mode

    c.selection = ml_collections.ConfigDict()
    # Estimates column scored: "loss" | "accuracy" | "mean_output" | "exact_loss"; "loss" means
    # exact_loss (the forward pass at θ* + Δ) when surrogate.mode = "exact".
    c.selection.metric = "loss"
    # How sources are chosen: "ensemble" (the top selection.top by random-ensemble score),
    # "threshold" (every source whose ensemble score, higher is better, is >= selection.threshold),
    # "forward" (greedy forward stepwise selection on the surrogate, at most selection.top
    # sources) or "ordered" (one pass in ensemble-score order, keeping what helps the surrogate).
    c.selection.method = "ensemble"
    c.selection.top = 0.5  # keep this fraction (or count) of sources
    c.selection.n_boot = 1000  # bootstrap replicates for the score intervals
    c.selection.seed = 0  # bootstrap and random-baseline seed
    c.selection.threshold = 0.0  # method "threshold": the lowest ensemble score kept
    c.selection.min_gain = 0.0  # "forward" / "ordered": the smallest improvement that adds a source

    c.groups = _section(GroupsSpec)  # the fields of jaxgrad.groups.GroupsSpec

    c.pipeline = ml_collections.ConfigDict()
    # Final fine-tunes: the selection and the baselines (all sources; random; the top sources by
    # gradient similarity, LESS-style; by last-layer representation similarity at θ*).
    c.pipeline.finetune_runs = ("selection", "all", "random", "grad_sim", "repr_sim")
    # Steps of every final fine-tune (the same budget for each); 0 = train.num_steps / train.epochs.
    c.pipeline.finetune_steps = 0
    # Seed of the final fine-tunes (data order, dropout, fresh adapters' init); -1 = train.seed /
    # lora.seed. Varies the final fine-tunes across seeds while one meta-training serves them all.
    c.pipeline.finetune_seed = -1
    # A stage's artefacts in the run directory were computed under another config (stages.json):
    # "error" (name the changed keys, delete nothing) | "rerun" (delete it and downstream, recompute)
    c.pipeline.on_config_change = "error"
    # Run the fidelity stage: θ* really fine-tuned on fidelity.num_subsets subsets of the estimates
    # table, compared with the estimates (the report adds the table and fidelity.png).
    c.pipeline.fidelity = False

    c.fidelity = fidelity_section()
    return c


def fidelity_section() -> ml_collections.ConfigDict:
    """``fidelity``, the settings of the fidelity stage (jaxgrad.fidelity.FidelityConfig's
    defaults)."""
    f = ml_collections.ConfigDict()
    f.num_subsets = 8  # subsets of the estimates table really fine-tuned from theta*
    f.steps = 8  # fine-tuning steps per subset (short: the first-order regime)
    f.learning_rate = 0.0625  # constant fine-tuning learning rate (no warmup)
    f.optimizer = "sgd"  # "sgd" (gradient steps, what Delta_S approximates) | "adamw"
    f.batch_size = 0  # examples per step (0 = train.batch_size)
    # Gradient clipping (< 0 = train.max_grad_norm, 0 = off). Below the gradient norms every step
    # has length learning_rate * max_grad_norm, for every subset, like the surrogate's Delta_S.
    f.max_grad_norm = 0.1
    f.calibrate = True  # also report estimates at jaxgrad.fidelity.suggest_scale
    return f
