"""The training stages driven by a config: the tiny base model of the demo (:func:`stage_base`),
meta-training θ* on every source (:func:`meta_train`, :func:`stage_meta_train`), and
:func:`load_theta_star`, the θ* every later stage starts from.

These are the functions here that read an ml_collections config (converted at once to the typed
:class:`jaxgrad.config.TrainConfig`, :class:`jaxgrad.config.ModelSpec` and ``LoraConfig``). With
``train.distributed=True`` they call ``jax.distributed.initialize()`` first.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from jaxgrad import rundir
from jaxgrad.common.distributed import describe_devices, initialize_distributed
from jaxgrad.common.jsonio import jsonable, read_json, write_json
from jaxgrad.config import ModelSpec, TrainConfig
from jaxgrad.data.batching import num_batches
from jaxgrad.data.examples import make_examples
from jaxgrad.data.sources import load_data
from jaxgrad.data.synthetic import generic_text
from jaxgrad.data.tokenizer import build_char_tokenizer
from jaxgrad.models.hub import build_model, save_pretrained
from jaxgrad.models.llama import LlamaConfig, to_hf_config
from jaxgrad.models.loading import load_model, lora_from_config
from jaxgrad.train.checkpoint import restore_params
from jaxgrad.train.loop import TrainResult, fit, save_adapter


def save_config(config: Any, run_dir: str) -> None:
    """The full config as ``<run_dir>/config.json`` (process 0), for the record."""
    if jax.process_index() != 0:
        return
    os.makedirs(run_dir, exist_ok=True)
    text = (config.to_json_best_effort(indent=1) if hasattr(config, "to_json_best_effort")
            else json.dumps(jsonable(config), indent=1))
    with open(os.path.join(run_dir, rundir.CONFIG_FILE), "w") as f:
        f.write(text + "\n")


def meta_train(config: Any, workdir: str) -> TrainResult:
    """Stage 1: LoRA-fine-tune on every source's train split; θ* into ``<workdir>/meta_train``.

    Validation: every source's validation split (loss per source, accuracy where answers exist).
    Writes ``ckpt/``, ``metrics.jsonl`` and the PEFT ``adapter/``.
    """
    cfg = TrainConfig.from_config(config.train, config.mesh)
    initialize_distributed(cfg.distributed)
    describe_devices()
    spec = ModelSpec.from_config(config.model)
    data = load_data(config.data)
    model, tokenizer = load_model(spec, lora_from_config(config.lora))
    run_dir = os.path.join(workdir, rundir.META_TRAIN_DIR)
    save_config(config, run_dir)
    result = fit(model, tokenizer, data.examples("train"), cfg, run_dir,
                 val_examples=data.examples("validation"), sources=data.sources,
                 extract_answer=data.extract_answer if data.answer_format else None)
    save_adapter(result.model, run_dir, base_model_name_or_path=spec.name_or_path or None)
    return result


def load_theta_star(config, workdir: str):
    """The meta-trained model θ* (base + LoRA restored from the meta_train checkpoint)."""
    model, tokenizer = load_model(ModelSpec.from_config(config.model), lora_from_config(config.lora))
    restore_params(model, os.path.join(workdir, rundir.META_TRAIN_CKPT), "latest")
    return model, tokenizer


def stage_base(config, workdir: str) -> str | None:
    """Pretrain a tiny base model from scratch on generic synthetic text (demo; no downloads).

    The text (``jaxgrad.data.synthetic.generic_text``) belongs to none of the sources, so the
    base knows characters and simple structure but none of the tasks, as a pretrained LM would.
    Saved in Hugging Face format: from here every stage runs exactly as on a real checkpoint.
    """
    if config.get("base") is None or not config.base.pretrain:
        return None
    out = os.path.join(workdir, rundir.BASE_DIR)
    if os.path.isfile(os.path.join(workdir, rundir.BASE_MODEL_FILE)):
        return out
    b = config.base.to_dict() if hasattr(config.base, "to_dict") else dict(config.base)
    tokenizer = build_char_tokenizer()
    cfg = base_model_config(config, len(tokenizer))
    model = build_model(cfg, seed=int(b["seed"]))
    texts = generic_text(int(b["num_texts"]), seed=int(b["seed"]))
    examples = make_examples(("generic", "", t, None) for t in texts)
    tc = base_train_config(config)
    result = fit(model, tokenizer, examples, tc, os.path.join(workdir, rundir.BASE_RUN_DIR))
    save_pretrained(result.model, out, to_hf_config(cfg), tokenizer)
    write_json(os.path.join(workdir, rundir.PRETRAIN_FILE), {"steps": tc.num_steps, **result.metrics})
    return out


def base_model_config(config, vocab_size: int) -> LlamaConfig:
    """The Llama config of the base :func:`stage_base` builds (``model.scratch``).

    Raises:
      ValueError: ``model.family`` is not "llama", or a ``model.scratch`` field LlamaConfig
        refuses (checked before any stage by ``jaxgrad.pipeline.validate``).
    """
    family = str(config.model.get("family", "llama") or "llama")
    if family != "llama":
        raise ValueError(f"config.base.pretrain builds a Llama-family base; config.model.family is "
                         f"{family!r}. Set model.family = 'llama', or base.pretrain = False and "
                         "model.name_or_path to a pretrained checkpoint")
    return LlamaConfig(**{**dict(config.model.scratch), "vocab_size": vocab_size})


def base_train_config(config) -> TrainConfig:
    """How :func:`stage_base` pretrains: ``base.learning_rate`` / ``steps`` / ``seed``, and the
    batch size, length and progress bar of ``train``.

    Raises:
      ValueError: a value TrainConfig refuses (checked before any stage by
        ``jaxgrad.pipeline.validate``, which names the config key).
    """
    b = config.base
    return TrainConfig(learning_rate=float(b["learning_rate"]), warmup_steps=20, end_lr_ratio=0.1,
                       batch_size=int(config.train.batch_size),
                       max_length=int(config.train.max_length), num_steps=int(b["steps"]),
                       full_finetune=True, seed=int(b["seed"]),
                       progress=bool(config.train.progress), log_every=50, async_checkpoint=False,
                       keep_checkpoints=1, best_metric="train_loss", schedule="cosine")


def stage_meta_train(config, workdir: str) -> dict:
    """Step 1: LoRA meta-training on the union of all sources (θ*)."""
    done = os.path.join(workdir, rundir.META_TRAIN_DONE)
    if os.path.isfile(done):
        return read_json(done)
    result = meta_train(config, workdir)
    summary = {"step": result.step, "metrics": result.metrics}
    if stopped_early(config, result.step, lambda data: data.examples("train")):
        return {**summary, "stopped_early": True}  # not done: the next run resumes
    write_json(done, summary)
    return summary


def stopped_early(config, step: int, train_examples) -> bool:
    """Whether a training run stopped at ``train.stop_after_steps`` before its last step."""
    stop = int(config.train.get("stop_after_steps", 0) or 0)
    if stop <= 0 or step < stop:
        return False
    cfg = TrainConfig.from_config(config.train, config.mesh)
    n = len(train_examples(load_data(config.data)))
    return step < cfg.total_steps(num_batches(n, cfg.batch_size))
