r"""Instruction tuning (the paper's Alpaca setting): TinyLlama 1.1B with LoRA r=128, alpha=512.

Sources are the skills of an Alpaca-format file (instruction / input / output plus a ``skill``
column naming each row's source; see jaxgrad/data/sources.py, format ``alpaca``). Paper
settings: learning rate 2e-5, max length 256, batch 128, 10 epochs, LoRA rank 128, alpha 512 on
the attention projections.

Commands (from the repository root; the model needs the Hugging Face Hub or a local copy passed
as --config.model.name_or_path=/path/to/TinyLlama):

  python scripts/meta_train.py --config=configs/llama_alpaca.py --workdir=checkpoints/alpaca \
      --config.data.files.path=data/alpaca_skills.jsonl --config.data.files.target=<skill>
  python scripts/finetune.py --config=configs/llama_alpaca.py --workdir=checkpoints/alpaca \
      --config.data.files.path=data/alpaca_skills.jsonl --config.data.files.target=<skill> \
      --config.finetune.selection_file=checkpoints/alpaca/selection/selected.json

Variant ``configs/llama_alpaca.py:bf16`` computes in bfloat16 with bfloat16 base weights.

Expected runtime: meta-training is 10 epochs of ceil(N / 128) steps for N training rows. Not
measured on the paper's data here; on one H100 an optimizer step of this configuration (128 x 256
tokens, bfloat16) is of the order of a second, so 52k Alpaca rows (about 4,100 steps) take about
an hour; float32 is several times slower. On CPU this config is impractical.
"""

import ml_collections

from jaxgrad.config_sections import add_method_sections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The Alpaca config; ``arg``: None / "default", or "bf16"."""
    variant = arg or "default"
    if variant not in ("default", "bf16"):
        raise ValueError(f"configs/llama_alpaca.py: unknown variant {variant!r}; expected "
                         "'default' or 'bf16'")
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.name_or_path = "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"  # HF name or dir
    c.model.family = "llama"  # from-scratch family (unused with name_or_path)
    c.model.scratch = {}  # from-scratch config fields (unused with name_or_path)
    c.model.tokenizer = ""  # "" = the model's own tokenizer
    c.model.dtype = "float32"  # compute dtype: "float32" | "bfloat16"
    c.model.param_dtype = "float32"  # storage dtype of the frozen base weights
    c.model.seed = 0  # initialisation seed (from scratch only)

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 128  # adapter rank r (paper)
    c.lora.alpha = 512.0  # scaling numerator: update = (alpha / r) B A (paper)
    c.lora.dropout = 0.0  # dropout on the adapter input
    c.lora.target_modules = "q_proj,k_proj,v_proj"  # adapted layers ("" = family default)
    c.lora.seed = 0  # seed of the lora_A initialisation

    c.data = ml_collections.ConfigDict()
    c.data.kind = "files"  # "synthetic" or "files"
    c.data.files = dict(  # SourcesSpec fields (jaxgrad/data/sources.py); "" means None
        format="alpaca",  # instruction / input / output rows, Stanford Alpaca prompt template
        path="data/alpaca_skills.jsonl",  # local file(s) with a `skill` column
        hub="",  # or a Hub dataset name (needs network)
        hub_config="",  # Hub dataset configuration
        hub_split="train",  # Hub split read (then split per source here)
        file_type="",  # "" = from the file suffix
        source="",  # a fixed source name for every row ("" = the skill column)
        answer_format="",  # answers are free text: loss only, no accuracy
        target="",  # the target skill (required for selection)
        validation=0.1,  # per source: validation fraction or count
        test=0.1,  # per source: test fraction or count
        max_examples=0,  # per source cap (0 = all)
        seed=0,  # split seed
        allow_pickle=False,  # never unpickle unless the file is trusted
    )

    c.train = ml_collections.ConfigDict()
    c.train.learning_rate = 2e-5  # peak learning rate (paper)
    c.train.schedule = "linear"  # decay after warmup
    c.train.warmup_steps = 100  # linear warmup steps
    c.train.end_lr_ratio = 0.0  # final lr / peak lr
    c.train.weight_decay = 0.0  # AdamW weight decay
    c.train.adam_b1 = 0.9  # AdamW beta1
    c.train.adam_b2 = 0.999  # AdamW beta2
    c.train.adam_eps = 1e-8  # AdamW epsilon
    c.train.max_grad_norm = 1.0  # gradient clipping
    c.train.batch_size = 128  # global batch size (paper)
    c.train.grad_accum_steps = 4  # 4 micro-batches of 32 (fits a 1.1B model on one 80 GB GPU)
    c.train.max_length = 256  # tokens per sequence (paper)
    c.train.epochs = 10  # passes over the data (paper)
    c.train.num_steps = 0  # > 0 overrides epochs
    c.train.seed = 0  # data order and dropout seed
    c.train.full_finetune = False  # LoRA only
    c.train.eval_every = 0  # 0 = every epoch end
    c.train.eval_batch_size = 64  # validation batch size
    c.train.max_new_tokens = 0  # no generation: free-text answers are scored by loss
    c.train.log_every = 10  # steps between train-loss rows
    c.train.save_every = 0  # 0 = every epoch end
    c.train.keep_checkpoints = 2  # latest checkpoints kept (plus the best)
    c.train.best_metric = "val_loss"  # metric choosing the best checkpoint
    c.train.best_mode = "min"  # "min" | "max"
    c.train.async_checkpoint = True  # background checkpoint writes
    c.train.stop_after_steps = 0  # > 0: save and stop at this step
    c.train.progress = True  # tqdm progress bar
    c.train.distributed = False  # jax.distributed.initialize() (multi-host)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel axis (-1 = all devices left after `model`)
    c.mesh.model = 1  # tensor-parallel axis
    c.mesh.fsdp = False  # shard parameters over "data" as well
    c.mesh.rules = None  # partition rules; None = jaxgrad.sharding.DEFAULT_RULES

    c.finetune = ml_collections.ConfigDict()
    c.finetune.sources = ""  # comma-separated sources
    c.finetune.selection_file = ""  # or a file naming them
    c.finetune.name = ""  # run name under finetune/ ("" = sources joined by "+")

    if variant == "bf16":
        c.model.dtype = "bfloat16"
        c.model.param_dtype = "bfloat16"
    add_method_sections(c)  # gradients, surrogate, selection, pipeline, fidelity
    return c
