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
      --config.finetune.selection_file=checkpoints/alpaca/selection/selection.json

Variant ``configs/llama_alpaca.py:bf16`` computes in bfloat16 with bfloat16 base weights.

Expected runtime: meta-training is 10 epochs of ceil(N / 128) steps for N training rows. Not
measured on the paper's data here; on one H100 an optimizer step of this configuration (128 x 256
tokens, bfloat16) is of the order of a second, so 52k Alpaca rows (about 4,100 steps) take about
an hour; float32 is several times slower. On CPU this config is impractical.
"""

import ml_collections

from jaxgrad.config import default_config, files_section

def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The Alpaca config; ``arg``: None / "default", or "bf16"."""
    variant = arg or "default"
    if variant not in ("default", "bf16"):
        raise ValueError(f"configs/llama_alpaca.py: unknown variant {variant!r}; expected "
                         "'default' or 'bf16'")
    c = default_config()  # every key with its meaning: jaxgrad/config.py

    c.model.name_or_path = "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"  # HF name or dir

    c.lora.rank = 128  # adapter rank r (paper)
    c.lora.alpha = 512.0  # scaling numerator: update = (alpha / r) B A (paper)
    c.lora.target_modules = "q_proj,k_proj,v_proj"  # adapted layers ("" = family default)

    c.data.kind = "files"  # "synthetic" or "files"
    c.data.files = files_section(  # SourcesSpec fields (jaxgrad/data/sources.py); "" means None
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

    c.train.learning_rate = 2e-5  # peak learning rate (paper)
    c.train.warmup_steps = 100  # linear warmup steps
    c.train.batch_size = 128  # global batch size (paper)
    c.train.grad_accum_steps = 4  # 4 micro-batches of 32 (fits a 1.1B model on one 80 GB GPU)
    c.train.max_length = 256  # tokens per sequence (paper)
    c.train.epochs = 10  # passes over the data (paper)
    c.train.eval_batch_size = 64  # validation batch size
    # max_new_tokens stays 0: no generation, free-text answers are scored by loss.

    if variant == "bf16":
        c.model.dtype = "bfloat16"
        c.model.param_dtype = "bfloat16"
    return c
