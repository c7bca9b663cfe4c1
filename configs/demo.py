r"""Demo (the embedded default of `make demo`): GradEx on synthetic tasks with a tiny Llama, on CPU.

Seven synthetic sources (jaxgrad/data/synthetic.py): the target ``add`` (2-digit addition with the
column steps written out), two related tasks (``sub``, and ``add_digit``: addition of a one-digit
number in ``add``'s format), label-noise copies of ``add`` and ``sort`` (the tasks' prompts with
another problem's completion) and two unrelated random-string sources. The base is a two-layer
Llama (hidden 64, jaxgrad's character tokenizer) pretrained from scratch on generic text that is
none of the sources (stage ``base``), saved as a Hugging Face checkpoint; rank-16 LoRA adapters on
every linear layer are meta-trained on all sources.

What the settings are for. θ* must have learnt the target, otherwise clean and noisy ``add`` look
alike to it (same format, same digits): 1500 steps at lr 5e-3 over 600 examples per source bring
``add`` to validation loss 0.33, and ``noisy_add``'s mean gradient then points against the
target's (cosine -0.45). ``token_ce`` drops what θ* already predicts (the format) from the
gradients; k = 2048 keeps projection noise (about 1/sqrt(k) of a cosine) below the small cosines
that order the middle ranks; subsets of two sources let each source's own effect show. Two-digit
problems (at most 27 tokens) keep every step cheap and let a fine-tune from the base learn ``add``
in 1000 steps; with three digits (41 tokens) the fine-tunes needed 1250 steps to tell the
selection from all sources, and the demo took 6.5 minutes.

copy / reverse / sort are left out of the task sources on purpose. They neither help nor hurt
``add``, and θ* is trained on everything, so the sources' gradients sum to about zero: irrelevant
sources, clean or not, get estimated effects near zero and land among the unrelated ones by chance
(ranking AUC 0.5 to 0.95 over three seeds with copy / reverse in). Clean ``sort`` is worse: it
shares its prompts with ``noisy_sort`` and the two sources' gradient sums cancel (cosine -0.8).

Command (from the repository root):

  python scripts/run_pipeline.py --config=configs/demo.py --workdir=checkpoints/demo

Variants: ``configs/demo.py:tiny`` (3 sources, a few steps: what the tests and CI run).

Expected runtime and result (jax 0.10.2, 2026-12-01; README "What `make demo` shows", which
gives each machine's tables): a fresh `make demo` (empty compilation cache) took 2 min 55 s on 2
idle Intel Xeon cores (261 CPU-seconds; base 21 s for 800 steps, meta_train 45 s for 1500 steps,
gradients 16 s, estimates 6 s, selection 6 s, three final fine-tunes of 1000 steps 62 s,
fidelity 14 s) and 2 min 6 s on 2 idle AMD EPYC cores (184 CPU-seconds). Floating-point
rounding differs between the two CPUs and 1500 training steps carry it to another θ*, so the
figures differ; on both, ``add`` and ``add_digit`` rank first and ``noisy_add`` last, and
fine-tuning on the selection beats all sources (target test loss 0.094 against 0.381 on the
Intel machine, 0.088 against 0.451 on the AMD one); the middle ranks, whose intervals overlap,
differ (ranking AUC 1.0 and 0.75), as do the linearized estimates' fidelity (Spearman 0.94 and
-0.32; the exact estimates' 0.95 and 0.93).
"""

import ml_collections

from jaxgrad.config import default_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The demo config; ``arg`` picks a variant: None / "default", or "tiny".

    Every key with its meaning is in jaxgrad/config.py; only the demo's choices are here.
    """
    variant = arg or "default"
    if variant not in ("default", "tiny"):
        raise ValueError(f"configs/demo.py: unknown variant {variant!r}; expected 'default' or "
                         "'tiny'")
    c = default_config()

    c.model.scratch = dict(  # LlamaConfig fields of the from-scratch model
        vocab_size=103,  # jaxgrad's character tokenizer: 4 specials + 99 characters
        hidden_size=64,  # model width
        intermediate_size=128,  # MLP width
        num_hidden_layers=2,  # decoder layers
        num_attention_heads=4,  # query heads
        num_key_value_heads=2,  # key/value heads (grouped-query attention)
        head_dim=16,  # per-head width
    )
    c.model.tokenizer = "char"  # jaxgrad's character tokenizer

    # Adapted layers; with a random base the LM head needs an adapter to move the outputs.
    c.lora.target_modules = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head"

    c.data.synthetic = dict(  # SyntheticSpec fields (jaxgrad/data/synthetic.py)
        # Task sources: the target and the tasks that share its skills (column-wise digit steps).
        # copy / reverse / sort are left out on purpose: they neither help nor hurt `add`, so a
        # target-gradient method ranks them among the unrelated sources by chance (see above).
        tasks=("add", "sub", "add_digit"),
        target="add",  # target task: its validation split scores subsets
        noisy=("add", "sort"),  # tasks that get a label-noise copy noisy_<task>
        unrelated=2,  # random-string sources unrelated_<i>
        n_train=600,  # train examples per source (fewer are memorised by meta-training)
        n_validation=50,  # validation examples per source
        n_test=100,  # test examples per source (final report only)
        # Operand digits of add / sub / add_digit. Two digits keep every example within 27 tokens
        # (3 digits: 41) and let a fine-tune learn `add` in 1000 steps. add_digit has 900 prompts,
        # about 790 once the target's validation and test prompts are reserved: 750 are drawn.
        max_digits=2,
        max_chars=4,  # string length of copy / reverse / sort / parity / unrelated
        seed=0,  # generator seed
    )

    c.train.learning_rate = 5e-3  # peak learning rate (1e-2 stalls the multi-task LoRA run)
    c.train.schedule = "cosine"
    c.train.warmup_steps = 20
    c.train.end_lr_ratio = 0.1
    c.train.max_length = 32  # the 2-digit tasks need at most 27 tokens
    c.train.num_steps = 1500  # about 11 epochs of the 7 x 600 examples
    # Evaluate and checkpoint at the end only: θ* is the last step, and each evaluation generates
    # answers for 350 validation examples (about 5 s); a run stopped early restarts its stage.
    c.train.eval_every = 1500
    c.train.max_new_tokens = 24  # greedy generation length for answer accuracy (answers: <= 20)
    c.train.save_every = 1500

    c.base.pretrain = True  # build a tiny base from scratch on generic text (no downloads)
    c.base.steps = 800

    # k: numbers stored per sample. Inner products of projected gradients carry noise of about
    # 1/sqrt(k) of the norms: at k=256 that outweighs the small cosines that order the middle ranks.
    c.gradients.projection_dim = 2048
    # token_ce: tokens θ* already predicts (the format) add ~nothing to g_i, so what is left is
    # what θ* gets wrong, where clean and noisy data differ (logit_odds ranked noisy_add first).
    c.gradients.output_fn = "token_ce"
    c.gradients.batch_size = 64
    # P is regenerated once per chunk: one chunk per batch of 64 (64 x 35k gradient numbers)
    # makes the stage about a third faster than chunks of 16.
    c.gradients.chunk_size = 64
    c.gradients.shard_size = 512

    # ||Delta|| / ||theta*_LoRA||: the size of the fine-tuning step the estimates stand for. The
    # ranking does not depend on it (every c_S scales alike). 0.012 is what jaxgrad.pipeline.fidelity's
    # suggest_scale measures against one clipped SGD step from θ* per pair (the report's fidelity
    # section: "calibrated" rows).
    c.surrogate.scale = 0.012
    c.surrogate.num_subsets = 21  # 21 = every pair of the 7 sources
    # 0.3 of 7 sources = pairs. Small subsets let each source's own effect show; in half-subsets
    # (0.5) the middle ranks drown in the others.
    c.surrogate.subset_size = 0.3
    c.surrogate.chunk_subsets = 200

    c.pipeline.finetune_steps = 1000  # steps of every final fine-tune (same budget for each run)
    # The default's runs but `random` (4 of 7 sources drawn at random: about 20 s of the demo's
    # 3 minutes). --config.pipeline.finetune_runs=selection,all,random,grad_sim,repr_sim adds it
    # to a finished run without redoing the others.
    c.pipeline.finetune_runs = ("selection", "all", "grad_sim", "repr_sim")

    # Fidelity stage (14 s on idle cores): every pair really fine-tuned from θ* by one full-batch
    # SGD step (2 x 600 examples) clipped to norm 0.1, so every pair moves the same distance, as
    # Delta_S does. One step on one batch is computed from the 7 sources' gradient sums
    # (jaxgrad.pipeline.fidelity).
    c.pipeline.fidelity = True
    c.fidelity.num_subsets = 21
    c.fidelity.steps = 1
    c.fidelity.learning_rate = 0.5
    c.fidelity.batch_size = 1200

    if variant == "tiny":
        c.model.scratch.hidden_size = 32
        c.model.scratch.intermediate_size = 64
        c.model.scratch.head_dim = 8
        c.data.synthetic.tasks = ("add", "copy")
        c.data.synthetic.noisy = ("add",)
        c.data.synthetic.unrelated = 0
        c.data.synthetic.n_train = 32
        c.data.synthetic.n_validation = 8
        c.data.synthetic.n_test = 8
        c.data.synthetic.max_digits = 2
        c.data.synthetic.max_chars = 4
        c.train.batch_size = 8
        c.train.max_length = 32
        c.train.epochs = 1
        c.train.num_steps = 4
        c.train.warmup_steps = 0
        c.train.max_new_tokens = 8
        c.train.log_every = 2
        c.train.progress = False
        c.base.steps = 20
        c.base.num_texts = 200
        c.gradients.projection_dim = 32
        c.surrogate.scale = 0.008  # tiny's own: tests/fixtures/run_v1 was written with it
        c.surrogate.num_subsets = 6
        c.surrogate.subset_size = 0.34  # one source of three
        c.selection.top = 0.34
        c.selection.n_boot = 50
        c.pipeline.finetune_steps = 4
        c.pipeline.finetune_runs = ("selection", "all", "random", "grad_sim", "repr_sim")  # every one
        c.fidelity.num_subsets = 3
        c.fidelity.batch_size = 0  # train.batch_size
    return c
