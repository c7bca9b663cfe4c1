"""Every config section with its documented default, the one source; ``configs/*.py`` start from
:func:`default_config` and override what differs (paper settings, the demo's tuning).

Sections: ``model``, ``lora``, ``data`` (what is trained), ``train``, ``mesh``, ``finetune`` (how),
and the GradEx method's ``base``, ``gradients``, ``groups``, ``surrogate``, ``selection``,
``pipeline``, ``fidelity``. Method defaults follow the paper's code: logit-odds outputs, a
Rademacher projection, the gradex surrogate objective with C = 1e-4, the update rescaled to
``scale`` times the LoRA norm, 1000 random subsets of half the sources, random-ensemble scores.

Every default is declared once, here. A section that the library reads through a dataclass is
built from that dataclass's field defaults, and each field's meaning is documented there:
``model`` (:class:`ModelSpec`), ``lora`` (:class:`LoraSection`, whose checks and PEFT rules are
:class:`jaxgrad.models.lora.LoraConfig`'s), ``train`` (:class:`TrainConfig`), ``mesh``
(:class:`MeshConfig`), ``gradients`` (:class:`GradientsConfig`; the keyword defaults of
:func:`jaxgrad.gradients.compute.compute_gradient_store` are its fields), ``groups``
(:class:`GroupsSection`, checked by :class:`jaxgrad.groups.GroupsSpec`) and ``fidelity``
(:class:`FidelityConfig`). Every other key is declared in :func:`default_config`, its meaning in a
comment. The allowed values of option keys are declared here too (:data:`OPTIMIZERS`,
:data:`SCHEDULES`, :data:`FORMATS`, :data:`GROUP_BY`, ...).

This module imports no other part of jaxgrad (it is at the bottom of the layout, with
:mod:`jaxgrad.common`), and ``ml_collections`` only inside the functions that build a config.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    import ml_collections

# ----------------------------------------------------------------------------------------------
# Allowed values of option keys.

SCHEDULES = ("cosine", "linear", "constant")  # train.schedule
OPTIMIZERS = ("adamw", "sgd")  # train.optimizer, fidelity.optimizer
GROUP_BY = ("source", "cluster")  # groups.by
GROUP_METHODS = ("agglomerative", "kmeans")  # groups.method
GROUP_METRICS = ("cosine",)  # groups.metric
FORMATS = ("generic", "alpaca", "flan", "cot", "bigbench")  # data.files.format
OUTPUT_FUNCTIONS = ("logit_odds", "token_ce")  # gradients.output_fn
PROJECTION_KINDS = ("rademacher", "gaussian")  # gradients.projection_kind
STORAGE_DTYPES = ("float32", "float16", "bfloat16")  # gradients.dtype
OBJECTIVES = ("gradex", "one_class", "taylor")  # surrogate.objective
SURROGATE_MODES = ("linearized", "exact")  # surrogate.mode
SELECTION_METRICS = ("loss", "accuracy", "mean_output", "exact_loss")  # selection.metric
SELECTION_METHODS = ("ensemble", "threshold", "forward", "ordered")  # selection.method
# Keys holding a list of names: a tuple, or a comma-separated string; set on a command line
# (--config.data.synthetic.tasks=add,sub) a tuple key arrives as ("add,sub",). Readers split them
# with common.checks.as_names, and fingerprints compare the names, not the spelling.
NAME_LISTS = ("data.synthetic.tasks", "data.synthetic.noisy", "groups.sources",
              "lora.target_modules", "pipeline.finetune_runs", "finetune.sources")
# pipeline.finetune_runs: the selection and its baselines (its default, and the report's order).
FINETUNE_RUNS = ("selection", "all", "random", "grad_sim", "repr_sim")
CONFIG_CHANGE_MODES = ("error", "rerun")  # pipeline.on_config_change

# The method sections' option keys and their allowed values (checked before the first stage).
CHOICES: dict[str, tuple] = {
    "gradients.output_fn": OUTPUT_FUNCTIONS,
    "gradients.projection_kind": PROJECTION_KINDS,
    "gradients.dtype": STORAGE_DTYPES,
    "surrogate.objective": OBJECTIVES,
    "surrogate.mode": SURROGATE_MODES,
    "selection.method": SELECTION_METHODS,
    "selection.metric": SELECTION_METRICS,
    "fidelity.optimizer": OPTIMIZERS,
    "pipeline.on_config_change": CONFIG_CHANGE_MODES,
}

# data.files.columns: the column roles of each format and their default column names. "source"
# may be None: the source is then the spec's `source` or the file's stem.
DEFAULT_COLUMNS: dict[str, dict[str, str | None]] = {
    "generic": {"prompt": "prompt", "completion": "completion", "source": "source", "answer": None},
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output",
               "source": "skill"},
    "flan": {"inputs": "inputs", "targets": "targets", "source": "_task_name"},
    "cot": {"question": "question", "rationale": "rationale", "answer": "answer", "source": None},
}

# Every role any format has (a config may name each; "" keeps the format's default column).
COLUMN_ROLES = tuple(dict.fromkeys(r for roles in DEFAULT_COLUMNS.values() for r in roles))

# data.files.validation / data.files.test: per source, a fraction in [0, 1) of its distinct
# examples (rounded) or a whole count >= 1 (jaxgrad.common.counts); the defaults of
# jaxgrad.data.sources.SourcesSpec.
DEFAULT_VALIDATION = 0.1
DEFAULT_TEST = 0.1

# LoraSection's PEFT fields that no config declares (a config may set them: known_config_keys).
LORA_PEFT_ONLY = ("target_regex", "exclude_modules", "exclude_regex", "layers_to_transform",
                  "layers_pattern", "rank_pattern", "alpha_pattern", "use_rslora")


def as_fields(section: Any, cls: type, name: str, exclude: Sequence[str] = ()) -> dict:
    """The keys of the config section ``section`` (a ConfigDict or mapping) as keyword arguments
    of the dataclass ``cls`` (lists as tuples).

    Raises:
      TypeError: ``section`` is not a mapping.
      ValueError: a key that is not a field of ``cls`` (the message lists the fields).
    """
    if hasattr(section, "to_dict"):
        section = section.to_dict()
    if not isinstance(section, Mapping):
        raise TypeError(f"config section {name!r} must be a mapping or ConfigDict, got "
                        f"{type(section).__name__}")
    allowed = [f.name for f in dataclasses.fields(cls) if f.name not in exclude]
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ValueError(f"config.{name} has unknown keys {unknown}; allowed: {allowed}")
    out = {}
    for k, v in section.items():
        out[k] = tuple(v) if isinstance(v, list) else v
    return out


# ----------------------------------------------------------------------------------------------
# Sections read through a dataclass: its field defaults are the section's defaults.



class ConfigError(ValueError):
    """A config (or its data) refused before any stage runs: the message names the setting, the
    file or the source and what was expected. The command-line scripts print it as one line and
    exit with status 2 (``jaxgrad.pipeline.runtime.resume_hint_on_interrupt``)."""

@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which model to load or build (the config's ``model``): ``from_config(config.model)``."""

    name_or_path: str = ""  # Hugging Face directory or Hub name; "" = build from `scratch`
    family: str = "llama"  # from scratch: a model_type of jaxgrad.models.hub.FAMILIES ("llama", "t5", ...)
    scratch: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # config fields (scratch)
    tokenizer: str = ""  # "" = the model directory's; "char" = jaxgrad's char tokenizer; or a path
    dtype: str = "float32"  # compute dtype: "float32" | "bfloat16"
    param_dtype: str = "float32"  # storage dtype of the base weights (LoRA weights stay float32)
    seed: int = 0  # initialisation seed (from scratch)

    @classmethod
    def from_config(cls, section: Any) -> "ModelSpec":
        fields = as_fields(section, cls, "model")
        if "scratch" in fields:
            fields["scratch"] = dict(fields["scratch"])
        return cls(**fields)


@dataclasses.dataclass(frozen=True)
class LoraSection:
    r"""The LoRA hyper-parameters (peft's fields jaxgrad honours), declared: the config's ``lora``
    holds every field but :data:`LORA_PEFT_ONLY`. :class:`jaxgrad.models.lora.LoraConfig` adds
    their checks and peft's module-selection rules (its docstring documents each field).

    A config spells ``target_modules`` None as ``""`` and ``rank`` 0 means no adapters
    (``jaxgrad.models.loading.lora_from_config``).
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    seed: int = 0
    target_regex: str | None = None
    exclude_modules: tuple[str, ...] | None = None
    exclude_regex: str | None = None
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    use_rslora: bool = False


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh and parameter partitioning (:mod:`jaxgrad.common.sharding`): the config's
    ``mesh``."""

    data: int = -1  # data-parallel axis size; -1 = all devices left after `model`
    model: int = 1  # tensor-parallel axis size
    fsdp: bool = False  # also shard each parameter's largest free dimension over "data"
    rules: tuple | None = None  # [(regex, axes), ...] partition rules; None = DEFAULT_RULES


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything the training loop needs; its field defaults are the config's ``train`` section.

    Build it from a config with ``TrainConfig.from_config(config.train, config.mesh)``.
    """

    # Optimizer and schedule.
    optimizer: str = "adamw"  # "adamw" | "sgd" (plain gradient descent, e.g. fidelity checks)
    learning_rate: float = 1e-4  # peak learning rate (after warmup)
    schedule: str = "linear"  # decay after warmup: "cosine" | "linear" | "constant"
    warmup_steps: int = 0  # linear warmup from 0 to learning_rate over this many steps
    end_lr_ratio: float = 0.0  # final learning rate = end_lr_ratio * learning_rate (cosine/linear)
    weight_decay: float = 0.0  # decoupled weight decay (× lr), matrices only (AdamW and SGD)
    adam_b1: float = 0.9  # AdamW beta1
    adam_b2: float = 0.999  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    max_grad_norm: float = 1.0  # clip gradients to this global norm; 0 disables clipping
    # Batches and length of training.
    batch_size: int = 32  # global batch (examples per optimizer step, all processes together)
    grad_accum_steps: int = 1  # micro-batches per step (scan); batch_size % (k * data axis) == 0
    max_length: int = 256  # tokens per sequence with bos/eos (T5: encoder, decoder each), truncated
    epochs: int = 1  # passes over the training data (ignored when num_steps > 0)
    num_steps: int = 0  # > 0: train exactly this many optimizer steps instead of `epochs`
    seed: int = 0  # data order, dropout keys
    # What is trained.
    full_finetune: bool = False  # False: LoRA adapters only (nnx.LoRAParam); True: every nnx.Param
    # Evaluation, logging, checkpoints.
    eval_every: int = 0  # evaluate every n steps; 0 = at the end of every epoch (always at the end)
    eval_batch_size: int = 0  # 0 = batch_size
    max_new_tokens: int = 0  # greedy generation length for answer accuracy; 0 = loss only
    log_every: int = 10  # write the mean train loss to metrics.jsonl every n steps
    save_every: int = 0  # checkpoint every n steps; 0 = every epoch end (always at the end)
    keep_checkpoints: int = 2  # latest checkpoints kept (the best one is kept as well)
    best_metric: str = "val_loss"  # metric choosing the best checkpoint ("train_loss" if no eval)
    best_mode: str = "min"  # "min" | "max": direction of best_metric
    async_checkpoint: bool = True  # write checkpoints in the background
    stop_after_steps: int = 0  # > 0: save and stop at this global step (preemption drills, tests)
    progress: bool = True  # tqdm progress bar on process 0
    # Distribution.
    mesh: MeshConfig = MeshConfig()  # device mesh and partitioning
    distributed: bool = False  # call jax.distributed.initialize() (multi-host) in the stages

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer must be one of {OPTIMIZERS}, got "
                             f"{self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must be one of {SCHEDULES}, got "
                             f"{self.schedule!r}")
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"TrainConfig.best_mode must be 'min' or 'max', got "
                             f"{self.best_mode!r}")
        for name, low in (("batch_size", 1), ("grad_accum_steps", 1), ("max_length", 2),
                          ("epochs", 0), ("num_steps", 0), ("warmup_steps", 0), ("eval_every", 0),
                          ("eval_batch_size", 0), ("max_new_tokens", 0), ("log_every", 1),
                          ("save_every", 0), ("keep_checkpoints", 1), ("stop_after_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"TrainConfig.{name} must be an int >= {low}, got {value!r}")
        if self.epochs == 0 and self.num_steps == 0:
            raise ValueError("TrainConfig: set epochs >= 1 or num_steps >= 1")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(f"TrainConfig.batch_size={self.batch_size} must be divisible by "
                             f"grad_accum_steps={self.grad_accum_steps}")
        for name in ("learning_rate", "weight_decay", "max_grad_norm"):
            if not getattr(self, name) >= 0:  # NaN too
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if isinstance(self.mesh, Mapping):
            object.__setattr__(self, "mesh", MeshConfig(**self.mesh))

    @classmethod
    def from_config(cls, train: Any, mesh: Any = None) -> "TrainConfig":
        """From the ``train`` (and ``mesh``) sections of an ml_collections config or dicts.

        Raises:
          ValueError: a key that is not a field (the message lists the fields).
        """
        fields = as_fields(train, cls, "train", exclude=("mesh",))
        if mesh is not None:
            mesh_fields = as_fields(mesh, MeshConfig, "mesh")
            if mesh_fields.get("rules") is not None:
                mesh_fields["rules"] = tuple(tuple(r) for r in mesh_fields["rules"])
            fields["mesh"] = MeshConfig(**mesh_fields)
        return cls(**fields)

    def total_steps(self, steps_per_epoch: int) -> int:
        return int(self.num_steps) if self.num_steps > 0 else int(self.epochs * steps_per_epoch)



@dataclasses.dataclass(frozen=True)
class GradientsConfig:
    """The ``gradients`` section: the projection and the gradient store. The keyword defaults of
    :func:`jaxgrad.gradients.compute.compute_gradient_store` are these fields' defaults."""

    projection_dim: int = 8192  # k: numbers stored per sample
    projection_kind: str = "rademacher"  # "rademacher" (±1/sqrt(k)) | "gaussian"
    projection_seed: int = 0  # seed of P (same P on every device and chunking)
    output_fn: str = "logit_odds"  # f_i: "logit_odds" (paper) | "token_ce"
    eps: float = 1e-6  # probability clipping of logit_odds
    batch_size: int = 32  # examples per jitted call
    chunk_size: int = 8  # examples per vmap chunk (memory: chunk x D gradients; P is
    # regenerated once per chunk, so larger chunks are faster)
    shard_size: int = 1024  # rows per store shard (the unit of resume)
    dtype: str = "float32"  # storage: "float32" | "float16" | "bfloat16"


@dataclasses.dataclass(frozen=True)
class GroupsSection:
    """The ``groups`` section, declared; :class:`jaxgrad.groups.GroupsSpec` checks it (its
    docstring documents each field; allowed values: :data:`GROUP_BY`, :data:`GROUP_METHODS`,
    :data:`GROUP_METRICS`)."""

    by: str = "source"
    sources: tuple[str, ...] = ()
    num_clusters: int = 20
    method: str = "agglomerative"
    metric: str = "cosine"
    seed: int = 0
    max_iter: int = 100


@dataclasses.dataclass(frozen=True)
class FidelityConfig:
    """The ``fidelity`` section, checked: the settings of the fidelity stage
    (:mod:`jaxgrad.pipeline.fidelity`)."""

    num_subsets: int = 8  # subsets of the estimates table really fine-tuned from theta*
    steps: int = 8  # fine-tuning steps per subset (short: the first-order regime)
    learning_rate: float = 0.0625  # constant fine-tuning learning rate (no warmup)
    optimizer: str = "sgd"  # "sgd" (gradient steps, what Delta_S approximates) | "adamw"
    batch_size: int = 0  # examples per step (0 = train.batch_size)
    # Gradient clipping (< 0 = train.max_grad_norm, 0 = off). Below the gradient norms every step
    # has length learning_rate * max_grad_norm, for every subset, like the surrogate's Delta_S.
    max_grad_norm: float = 0.1
    calibrate: bool = True  # also report estimates at jaxgrad.pipeline.fidelity.suggest_scale

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"fidelity.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("num_subsets", "steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"fidelity.{name} must be >= 1, got {getattr(self, name)!r}")
        if int(self.batch_size) < 0 or float(self.learning_rate) <= 0:
            raise ValueError("fidelity.batch_size must be >= 0 and fidelity.learning_rate > 0")


# ----------------------------------------------------------------------------------------------
# The config.


def default_config() -> ml_collections.ConfigDict:
    """All sections with their defaults (a from-scratch tiny Llama on the synthetic tasks)."""
    import ml_collections

    c = ml_collections.ConfigDict()
    add_model_sections(c)
    add_train_sections(c)
    add_method_sections(c)
    return c


def _section(cls: type, exclude: Sequence[str] = (), **config_spelling) -> ml_collections.ConfigDict:
    """The field defaults of the dataclass ``cls`` (but ``exclude``), in field order, as a config
    section; ``config_spelling`` gives a default as a config holds it (``""`` for None: a command
    line can then set a string)."""
    import ml_collections

    fields = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
              for f in dataclasses.fields(cls) if f.name not in exclude}
    assert set(config_spelling) <= set(fields), (cls.__name__, sorted(config_spelling))
    return ml_collections.ConfigDict({**fields, **config_spelling})


def add_model_sections(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``model``, ``lora`` and ``data``."""
    import ml_collections

    c.model = _section(ModelSpec)
    # LoraSection's fields but its PEFT ones, as a config spells them: rank 0 = no adapters (set
    # train.full_finetune); target_modules "a,b", "" = the family's default (None).
    c.lora = _section(LoraSection, exclude=LORA_PEFT_ONLY, target_modules="")

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
    :mod:`jaxgrad.common.counts`; the config fingerprints treat ``100`` and ``100.0`` alike).
    """
    import ml_collections

    fields = {"validation": DEFAULT_VALIDATION, "test": DEFAULT_TEST, **fields}
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
    import ml_collections

    c.train = _section(TrainConfig, exclude=("mesh",))
    c.mesh = _section(MeshConfig)

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
    import ml_collections

    c.base = ml_collections.ConfigDict()
    c.base.pretrain = False  # build a tiny base from scratch on generic text (demo only)
    c.base.steps = 400  # full-parameter pretraining steps
    c.base.learning_rate = 3e-3  # pretraining peak learning rate
    c.base.num_texts = 4000  # generic_text lines (belong to none of the sources)
    c.base.seed = 0  # initialisation and text seed

    c.gradients = _section(GradientsConfig)

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

    c.groups = _section(GroupsSection)

    c.pipeline = ml_collections.ConfigDict()
    # Final fine-tunes: the selection and the baselines (all sources; random; the top sources by
    # gradient similarity, LESS-style; by last-layer representation similarity at θ*).
    c.pipeline.finetune_runs = FINETUNE_RUNS
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

    c.fidelity = _section(FidelityConfig)
    return c
