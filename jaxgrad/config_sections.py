"""Every config section with its documented default; ``configs/*.py`` start from
:func:`default_config` and override what differs (paper settings, the demo's tuning).

Sections: ``model``, ``lora``, ``data`` (what is trained), ``train``, ``mesh``, ``finetune`` (how),
and the GradEx method's ``base``, ``gradients``, ``surrogate``, ``selection``, ``pipeline``,
``fidelity``. Method defaults follow the paper's code: logit-odds outputs, a Rademacher
projection, the gradex surrogate objective with C = 1e-4, the update rescaled to ``scale`` times
the LoRA norm, 1000 random subsets of half the sources, random-ensemble scores.
"""

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    """All sections with their defaults (a from-scratch tiny Llama on the synthetic tasks)."""
    c = ml_collections.ConfigDict()
    add_model_sections(c)
    add_train_sections(c)
    add_method_sections(c)
    return c


def add_model_sections(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``model``, ``lora`` and ``data``."""
    c.model = ml_collections.ConfigDict()
    c.model.name_or_path = ""  # Hugging Face dir / Hub name; "" = from scratch (model.scratch)
    c.model.family = "llama"  # from-scratch family: "llama" or "t5" (unused with name_or_path)
    c.model.scratch = {}  # config fields of the from-scratch model (unused with name_or_path)
    c.model.tokenizer = ""  # "" = the model directory's; "char" = jaxgrad's char tokenizer
    c.model.dtype = "float32"  # compute dtype: "float32" | "bfloat16"
    c.model.param_dtype = "float32"  # storage dtype of the frozen base weights
    c.model.seed = 0  # initialisation seed (from scratch only)

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 16  # adapter rank r (0 = no adapters: set train.full_finetune)
    c.lora.alpha = 32.0  # scaling numerator: update = (alpha / r) B A
    c.lora.dropout = 0.0  # dropout on the adapter input while training
    c.lora.target_modules = ""  # comma-separated adapted layers ("" = the family's default)
    c.lora.seed = 0  # seed of the lora_A initialisation

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
    fields = {"validation": 0.1, "test": 0.1, **fields}
    # Every column role of every format, "" = the format's default column, so that any of them
    # can be set on the command line (--config.data.files.columns.source=task): ml_collections
    # refuses keys a config does not hold.
    from jaxgrad.data.sources import COLUMN_ROLES

    fields["columns"] = {**{role: "" for role in COLUMN_ROLES}, **dict(fields.get("columns") or {})}
    for key in ("validation", "test"):
        value = fields[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            fields[key] = float(value)
    return ml_collections.ConfigDict(fields)


def add_train_sections(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``train`` (optimizer, schedule, evaluation, checkpoints), ``mesh`` and ``finetune``."""
    c.train = ml_collections.ConfigDict()
    c.train.optimizer = "adamw"  # "adamw" | "sgd" (plain gradient descent)
    c.train.learning_rate = 1e-4  # peak learning rate
    c.train.schedule = "linear"  # "cosine" | "linear" | "constant" after warmup
    c.train.warmup_steps = 0  # linear warmup steps
    c.train.end_lr_ratio = 0.0  # final lr / peak lr
    c.train.weight_decay = 0.0  # decoupled weight decay, matrices only (AdamW, and SGD too)
    c.train.adam_b1 = 0.9  # AdamW beta1
    c.train.adam_b2 = 0.999  # AdamW beta2
    c.train.adam_eps = 1e-8  # AdamW epsilon
    c.train.max_grad_norm = 1.0  # global-norm gradient clipping (0 = off)
    c.train.batch_size = 32  # global batch size
    c.train.grad_accum_steps = 1  # micro-batches per step
    c.train.max_length = 256  # tokens per sequence (encoder and decoder each, for T5)
    c.train.epochs = 1  # passes over the training data
    c.train.num_steps = 0  # > 0 overrides epochs
    c.train.seed = 0  # data order and dropout seed
    c.train.full_finetune = False  # False: LoRA adapters only
    c.train.eval_every = 0  # steps between evaluations (0 = every epoch end; always at the end)
    c.train.eval_batch_size = 0  # 0 = batch_size
    c.train.max_new_tokens = 0  # greedy generation length for answer accuracy (0 = off)
    c.train.log_every = 10  # steps between train-loss rows in metrics.jsonl
    c.train.save_every = 0  # steps between checkpoints (0 = every epoch end; always at the end)
    c.train.keep_checkpoints = 2  # latest checkpoints kept (plus the best)
    c.train.best_metric = "val_loss"  # metric choosing the best checkpoint
    c.train.best_mode = "min"  # "min" | "max"
    c.train.async_checkpoint = True  # write checkpoints in the background
    c.train.stop_after_steps = 0  # > 0: save and stop at this step (resume continues)
    c.train.progress = True  # tqdm progress bar
    c.train.distributed = False  # jax.distributed.initialize() (multi-host)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel axis (-1 = all devices left after `model`)
    c.mesh.model = 1  # tensor-parallel axis
    c.mesh.fsdp = False  # shard parameters over "data" as well
    c.mesh.rules = None  # [(regex, axes), ...]; None = jaxgrad.sharding.DEFAULT_RULES

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
    c.gradients.output_fn = "logit_odds"  # f_i: "logit_odds" (paper) | "token_ce"
    c.gradients.eps = 1e-6  # probability clipping of logit_odds
    c.gradients.batch_size = 32  # examples per jitted call
    c.gradients.chunk_size = 8  # examples per vmap chunk (memory: chunk x D gradients)
    c.gradients.shard_size = 1024  # rows per store shard (the unit of resume)
    c.gradients.dtype = "float32"  # storage: "float32" | "float16" | "bfloat16"

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

    c.groups = ml_collections.ConfigDict()
    # The units selected among (jaxgrad.groups): "source" (each train source) | "cluster" (the
    # paper's CoT protocol: clusters of samples by projected gradient, made after the gradients)
    c.groups.by = "source"
    # Sources whose train samples are clustered together (() = all); on the command line
    # --config.groups.sources="('a', 'b')" (a tuple: names may hold commas); read only with by=cluster
    c.groups.sources = ()
    c.groups.num_clusters = 20  # C clusters of those samples, named c00, c01, ...
    # "agglomerative" (average linkage, scipy; N(N-1)/2 float64 distances: up to 20k samples) |
    # "kmeans" (spherical k-means in JAX; no N x N matrix)
    c.groups.method = "agglomerative"
    c.groups.metric = "cosine"  # the only one: the direction of the projected gradients
    c.groups.seed = 0  # k-means seeding
    c.groups.max_iter = 100  # k-means Lloyd iterations at most

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

    c.fidelity = ml_collections.ConfigDict()
    c.fidelity.num_subsets = 8  # subsets of the estimates table really fine-tuned from theta*
    c.fidelity.steps = 8  # fine-tuning steps per subset (short: the first-order regime)
    c.fidelity.learning_rate = 0.0625  # constant fine-tuning learning rate
    c.fidelity.optimizer = "sgd"  # "sgd" (gradient steps, what Delta_S approximates) | "adamw"
    c.fidelity.batch_size = 0  # examples per step (0 = train.batch_size)
    # Gradient clipping (< 0 = train.max_grad_norm, 0 = off). Below the gradient norms every step
    # has length learning_rate * max_grad_norm, for every subset, like the surrogate's Delta_S.
    c.fidelity.max_grad_norm = 0.1
    c.fidelity.calibrate = True  # also report estimates at jaxgrad.fidelity.suggest_scale
    return c
