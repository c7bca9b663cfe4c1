"""Config sections of the GradEx method (gradients, surrogate, selection, pipeline, fidelity, base),
shared by every configs/*.py; each calls ``add_method_sections(c)`` and overrides what differs.

Defaults follow the paper's code: logit-odds outputs, a Rademacher projection, the gradex
surrogate objective with C = 1e-4, the update rescaled to ``scale`` times the LoRA norm, 1000
random subsets of half the sources, random-ensemble scores.
"""

import ml_collections


def add_method_sections(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
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
    c.selection.metric = "loss"  # estimate column scored: "loss" | "accuracy" | "mean_output"
    c.selection.top = 0.5  # keep this fraction (or count) of sources
    c.selection.n_boot = 1000  # bootstrap replicates for the score intervals
    c.selection.seed = 0  # bootstrap and random-baseline seed

    c.pipeline = ml_collections.ConfigDict()
    c.pipeline.finetune_runs = ("selection", "all", "random", "grad_sim")  # final fine-tunes
    c.pipeline.finetune_steps = 0  # steps of every final fine-tune (same budget); 0 = train.epochs

    c.fidelity = ml_collections.ConfigDict()
    c.fidelity.num_subsets = 8  # subsets of the estimates table really fine-tuned from theta*
    c.fidelity.steps = 60  # fine-tuning steps per subset
    c.fidelity.learning_rate = 1e-2  # fine-tuning learning rate
    return c
