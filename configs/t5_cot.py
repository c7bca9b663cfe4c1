r"""Chain-of-thought fine-tuning (the paper's CoT setting): Flan-T5-base with LoRA r=16, alpha=128.

Sources are reasoning tasks in the reasoning-teacher layout (question / rationale / answer), one
file per task named after it (``data/cot/<task>.jsonl``; the file stem is the source name). The
completion is ``"{rationale} Therefore, the answer is {answer}."`` and accuracy is the exact match
of the answer extracted from a greedy generation. Paper settings: learning rate 3e-4, 20 epochs,
batch 8, LoRA rank 16, alpha 128.

Commands (from the repository root; the model needs the Hub or a local copy via
--config.model.name_or_path):

  python scripts/meta_train.py --config=configs/t5_cot.py --workdir=checkpoints/cot
  python scripts/finetune.py --config=configs/t5_cot.py --workdir=checkpoints/cot \
      --config.finetune.sources=gsm8k,svamp

Variant ``configs/t5_cot.py:bf16`` computes in bfloat16.

Expected runtime: 20 epochs of ceil(N / 8) steps for N training rows, plus a generation pass over
the validation split (max_new_tokens=128) at every epoch end. Not measured on the paper's data
here; Flan-T5-base (250M parameters) at batch 8 x 256 tokens takes tens of milliseconds per step on
one H100, so the run is dominated by evaluation and takes on the order of an hour for ~10k rows.
"""

import ml_collections

from jaxgrad.config import default_config, files_section

COT_TASKS = ("addsub", "multiarith", "single_eq", "svamp", "gsm8k", "aqua", "date_understanding",
             "coin_flip", "last_letter_concatenation", "commonsense_qa", "strategy_qa",
             "tracking_shuffled_objects")

def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The CoT config; ``arg``: None / "default", or "bf16"."""
    variant = arg or "default"
    if variant not in ("default", "bf16"):
        raise ValueError(f"configs/t5_cot.py: unknown variant {variant!r}; expected 'default' or "
                         "'bf16'")
    c = default_config()  # every key with its meaning: jaxgrad/config.py

    c.model.name_or_path = "google/flan-t5-base"  # HF name or local dir
    c.model.family = "t5"  # from-scratch family (unused with name_or_path)

    c.lora.rank = 16  # adapter rank r (paper)
    c.lora.alpha = 128.0  # scaling numerator (paper)
    c.lora.target_modules = "q,k,v"  # adapted layers ("" = family default)

    c.data.kind = "files"  # "synthetic" or "files"
    c.data.files = files_section(  # SourcesSpec fields (jaxgrad/data/sources.py); "" means None
        format="cot",  # question / rationale / answer rows
        path=tuple(f"data/cot/{t}.jsonl" for t in COT_TASKS),  # one file per task (stem = source)
        hub="",  # or a Hub dataset name
        hub_config="",  # Hub dataset configuration
        hub_split="train",  # Hub split read
        file_type="",  # "" = from the file suffix
        source="",  # "" = the file stem names the source
        answer_format="",  # cot format always extracts "the answer is ..."
        target="gsm8k",  # the target task
        validation=0.1,  # per source: validation fraction or count
        test=0.1,  # per source: test fraction or count
        max_examples=0,  # per source cap (0 = all)
        seed=0,  # split seed
        allow_pickle=False,  # never unpickle unless the file is trusted
    )

    c.train.learning_rate = 3e-4  # peak learning rate (paper)
    c.train.batch_size = 8  # global batch size (paper)
    c.train.epochs = 20  # passes over the data (paper)
    c.train.eval_batch_size = 32  # validation batch size
    c.train.max_new_tokens = 128  # greedy generation length for answer accuracy
    c.train.log_every = 50  # steps between train-loss rows
    c.train.best_metric = "val_acc"  # metric choosing the best checkpoint
    c.train.best_mode = "max"  # accuracy: higher is better

    if variant == "bf16":
        c.model.dtype = "bfloat16"
    return c
