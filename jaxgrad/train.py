"""Sharded LoRA (or full) fine-tuning with optax, orbax checkpoints and exact resume.

Layers, from the inside out:

- :func:`train_step` / :func:`eval_step` are pure module-level functions of
  ``(graphdef, trainable, frozen, opt_state, batch, rng)``. The model is split once
  (``nnx.split(model, nnx.LoRAParam, ...)`` for LoRA, ``nnx.split(model, nnx.Param, ...)`` for
  full fine-tuning, LoRA factors included) and merged inside the step, so gradients are taken
  with respect to the trainable state only and the frozen base is never differentiated or copied.
  :func:`run_training` jits them with explicit ``in_shardings`` / ``out_shardings`` from
  :mod:`jaxgrad.common.sharding` and donates the trainable and optimizer buffers.
- Gradient accumulation is a ``lax.scan`` over ``k`` micro-batches inside one step (not
  ``optax.MultiSteps``): every micro-batch's summed cross-entropy is divided by the token count of
  the *whole* batch, so the accumulated gradient is exactly that of the big batch even when
  micro-batches hold different numbers of target tokens (``MultiSteps`` averages per-micro-batch
  means, which differs), and one optimizer update, one schedule step and one checkpoint step
  correspond to one global batch. Micro-batch ``i`` takes rows ``i, i + k, i + 2k, ...`` so that
  each data shard contributes to every micro-batch without moving rows between devices.
- The optimizer is ``clip_by_global_norm`` then AdamW (or plain SGD, ``optimizer="sgd"``; weight
  decay on matrices only) with a linear warmup followed by a cosine, linear or constant schedule.
- :class:`Evaluator` computes the validation loss, overall and per source (token-weighted mean
  cross-entropy), and the exact-match accuracy of greedy generations where examples carry an
  ``answer``. :func:`generate` is greedy decoding without a KV cache: a fixed buffer of
  ``prompt + max_new_tokens`` positions is re-run through the full forward pass at every step
  (decoders), or the decoder is re-run on a fixed ``max_new_tokens`` buffer with the encoder
  output computed once (T5). That costs ``max_new_tokens`` full forwards, fine for the small
  models and short answers we evaluate, and keeps one compiled program per shape.
- :func:`run_training` is the loop: checkpoints (:mod:`jaxgrad.checkpoint`) hold the trainable
  state, optimizer state, base RNG key, step and data position; a run restarted in the same
  directory resumes from the latest checkpoint and ends in the same state as an uninterrupted run
  (the data order is a function of ``(seed, epoch)`` and step keys are ``fold_in(rng, step)``).
  Progress goes to a tqdm bar and to ``metrics.jsonl`` (one JSON object per logged step or
  evaluation).
- :func:`fit` builds batches from example dicts (:mod:`jaxgrad.data.batching`), and
  :func:`meta_train` / :func:`finetune` are the pipeline stages driven by an ml_collections
  config: the only functions here that read one (converted at once to the typed
  :class:`jaxgrad.config.TrainConfig`, :class:`jaxgrad.config.ModelSpec` and ``LoraConfig``).

Multi-host: with ``distributed=True`` the stages call ``jax.distributed.initialize()`` first; each
process reads its own rows of every global batch (``process_index`` / ``process_count`` in the
batch iterator) and :func:`jaxgrad.common.sharding.shard_batch` assembles global arrays with
``jax.make_array_from_process_local_data``. Only process 0 writes logs and adapters; all
processes take part in checkpointing (orbax coordinates).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from jaxgrad._compat import moved_names
from jaxgrad import checkpoint as ckpt_lib
from jaxgrad import rundir
from jaxgrad.common import sharding as sharding_lib
from jaxgrad.common.distributed import barrier, describe_devices, initialize_distributed
from jaxgrad.common.jsonio import jsonable
from jaxgrad.common.progress import progress_bar
from jaxgrad.config import ModelSpec, TrainConfig, as_fields
from jaxgrad.data import batching
from jaxgrad.data.sources import load_data
from jaxgrad.fingerprint import check_finetune_run, finetune_run_values
from jaxgrad.losses import batch_loss, batch_token_count, model_logits, token_ce_sums

log = logging.getLogger(__name__)



# ----------------------------------------------------------------------------------------------
# Optimizer.


def make_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then ``cfg.schedule`` down to ``end_lr_ratio * learning_rate``."""
    lr = float(cfg.learning_rate)
    warm = min(int(cfg.warmup_steps), int(total_steps))
    decay = max(int(total_steps) - warm, 1)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(lr, lr * cfg.end_lr_ratio, decay)
    else:
        after = optax.cosine_decay_schedule(lr, decay, alpha=cfg.end_lr_ratio)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def _decay_mask(params: Any) -> Any:
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """``clip_by_global_norm`` (when ``max_grad_norm > 0``) then AdamW, or SGD, on the schedule.

    ``optimizer="sgd"`` is plain gradient descent (no momentum): the update is ``-lr·g`` (plus
    ``-lr·weight_decay·p`` on matrices when ``weight_decay > 0``, as AdamW's decoupled decay).
    """
    parts = []
    if cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    schedule = make_schedule(cfg, total_steps)
    if cfg.optimizer == "sgd":
        if cfg.weight_decay > 0:
            parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=_decay_mask))
        parts.append(optax.sgd(schedule))
    else:
        parts.append(optax.adamw(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                                 weight_decay=cfg.weight_decay, mask=_decay_mask))
    return optax.chain(*parts)


# ----------------------------------------------------------------------------------------------
# Pure steps.


def split_trainable(model: nnx.Module, full_finetune: bool = False):
    """``(graphdef, trainable, frozen)``: LoRA adapters vs the rest, or every Param vs the rest.

    Raises:
      ValueError: LoRA mode on a model without adapters.
    """
    if full_finetune:
        return nnx.split(model, nnx.Param, ...)
    graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
    if not jax.tree.leaves(trainable):
        raise ValueError("LoRA training needs LoRA adapters on the model (apply_lora / "
                         "load_pretrained(lora=...)), or set full_finetune=True")
    return graphdef, trainable, frozen


def _micro_batches(x: jax.Array, k: int) -> jax.Array:
    """``[B, ...] -> [k, B/k, ...]`` with micro-batch ``i`` = rows ``i, i+k, ...`` (strided)."""
    return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)


def loss_and_grads(graphdef: nnx.GraphDef, trainable: nnx.State, frozen: nnx.State,
                   batch: Mapping[str, jax.Array], rng: jax.Array | None, *,
                   grad_accum_steps: int = 1) -> tuple[jax.Array, nnx.State]:
    """Batch loss and its gradient w.r.t. ``trainable``, over ``grad_accum_steps`` micro-batches.

    The result does not depend on ``grad_accum_steps`` (up to float summation order): each
    micro-batch's summed cross-entropy is divided by the whole batch's token count.
    """
    normalizer = batch_token_count(batch)

    def micro_loss(params, micro, key):
        return batch_loss(nnx.merge(graphdef, params, frozen), micro, dropout_rng=key,
                          normalizer=normalizer)

    grad_fn = jax.value_and_grad(micro_loss)
    k = int(grad_accum_steps)
    if k == 1:
        return grad_fn(trainable, batch, rng)
    rows = next(iter(batch.values())).shape[0]
    if rows % k:
        raise ValueError(f"batch of {rows} rows does not split into grad_accum_steps={k} "
                         "micro-batches")
    micro = {name: _micro_batches(x, k) for name, x in batch.items()}
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)

    def body(carry, xs):
        loss_sum, grad_sum = carry
        i, mb = xs
        key = None if rng is None else jax.random.fold_in(rng, i)
        loss, grads = grad_fn(trainable, mb, key)
        grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
        return (loss_sum + loss, grad_sum), None

    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                    (jnp.arange(k), micro))
    return loss, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)


def train_step(graphdef: nnx.GraphDef, trainable: nnx.State, frozen: nnx.State, opt_state: Any,
               batch: Mapping[str, jax.Array], rng: jax.Array | None, *,
               tx: optax.GradientTransformation, grad_accum_steps: int = 1):
    """One optimizer step; returns ``(trainable, opt_state, metrics)``.

    ``metrics`` holds the batch ``loss`` (before the update) and the unclipped ``grad_norm``.
    """
    loss, grads = loss_and_grads(graphdef, trainable, frozen, batch, rng,
                                 grad_accum_steps=grad_accum_steps)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return trainable, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}


def eval_step(graphdef: nnx.GraphDef, trainable: nnx.State, frozen: nnx.State,
              batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-example summed cross-entropy and target-token count, ``[B]`` each (0 on padding rows).

    Per-source or per-example means are ratios of sums of these (computed on the host).
    """
    logits = model_logits(nnx.merge(graphdef, trainable, frozen), batch)
    sums, counts = token_ce_sums(logits, batch["targets"], batch["target_mask"])
    valid = jnp.asarray(batch["valid"], jnp.float32)
    return {"ce_sum": sums * valid, "tokens": counts * valid}


# ----------------------------------------------------------------------------------------------
# Greedy generation.


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id", "pad_id",
                                             "decoder_start_id"))
def _generate(state, input_ids, attention_mask, *, graphdef, max_new_tokens, eos_id, pad_id,
              decoder_start_id):
    model = nnx.merge(graphdef, state)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = (jnp.asarray(attention_mask) > 0).astype(jnp.int32)
    # Any padding side: move each row's prompt tokens to the front, in order (a stable sort on
    # "is padding"), so the prompt sits at positions 0..n-1 as when it is generated alone; this
    # is what transformers' generate gets from position_ids = cumsum(attention_mask) - 1.
    order = jnp.argsort(1 - attention_mask, axis=-1, stable=True)
    input_ids = jnp.take_along_axis(input_ids, order, axis=-1)
    attention_mask = jnp.take_along_axis(attention_mask, order, axis=-1)
    b = input_ids.shape[0]
    rows = jnp.arange(b)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    done = jnp.zeros((b,), bool)

    if getattr(model, "is_encoder_decoder", False):
        enc = model.encode(input_ids, attention_mask)
        dec = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(decoder_start_id)
        pos = jnp.arange(max_new_tokens)

        def body(i, carry):
            dec, out, done = carry
            logits = model.decode(enc, attention_mask, dec, (pos[None] <= i).astype(jnp.int32))
            tok = jnp.argmax(logits[:, i], axis=-1).astype(jnp.int32)
            tok = jnp.where(done, pad_id, tok)
            dec = dec.at[:, i + 1].set(tok, mode="drop")
            return dec, out.at[:, i].set(tok), done | (tok == eos_id)

        _, out, _ = jax.lax.fori_loop(0, max_new_tokens, body, (dec, out, done))
        return out

    # Decoder: prompts now right-padded; row r continues at position cur[r].
    cur = jnp.sum(attention_mask, axis=-1).astype(jnp.int32)
    buf = jnp.concatenate([jnp.where(attention_mask > 0, input_ids, pad_id),
                           jnp.full((b, max_new_tokens), pad_id, jnp.int32)], axis=1)
    pos = jnp.arange(buf.shape[1])

    def body(i, carry):
        buf, cur, out, done = carry
        logits = model(buf, (pos[None] < cur[:, None]).astype(jnp.int32))
        last = jnp.take_along_axis(logits, jnp.maximum(cur - 1, 0)[:, None, None], axis=1)[:, 0]
        tok = jnp.where(done, pad_id, jnp.argmax(last, axis=-1).astype(jnp.int32))
        buf = buf.at[rows, cur].set(tok, mode="drop")
        return buf, cur + 1, out.at[:, i].set(tok), done | (tok == eos_id)

    _, _, out, _ = jax.lax.fori_loop(0, max_new_tokens, body, (buf, cur, out, done))
    return out


def generate(model: nnx.Module, input_ids: jax.typing.ArrayLike,
             attention_mask: jax.typing.ArrayLike, *, max_new_tokens: int, eos_id: int,
             pad_id: int = 0, decoder_start_id: int | None = None) -> jax.Array:
    """Greedy continuation, ``[B, max_new_tokens]`` int32 (``pad_id`` after each row's eos).

    Each row's result equals generating its prompt alone, without padding, whichever side the
    batch is padded on: right (jaxgrad's batches) or left (the layout transformers' ``generate``
    expects, ``tokenizer.padding_side="left"``). The mask tells where the prompt is.

    Args:
      model: a decoder (prompts in ``input_ids``) or an encoder–decoder (encoder inputs; the
        decoder starts from ``decoder_start_id``, default the model config's
        ``decoder_start_token_id``, :func:`jaxgrad.data.batching.model_layout`).
      input_ids, attention_mask: ``[B, L]``; ``attention_mask`` is 1 on prompt tokens, which
        must be one contiguous run per row (left, right or no padding). A row of zeros is a
        filler row of a fixed-size batch: it is generated for, and its tokens mean nothing.
      max_new_tokens: tokens generated per row (fixed: one compiled loop).
      eos_id: end-of-sequence id; a row stops after emitting it.
      pad_id: filler after eos.

    Raises:
      ValueError: shapes differ or are not ``[B, L]``; a row's mask has a hole (not a padding
        layout: checked when the mask is readable on this host).
    """
    if int(max_new_tokens) < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens!r}")
    if np.shape(input_ids) != np.shape(attention_mask) or len(np.shape(input_ids)) != 2:
        raise ValueError(f"generate: input_ids and attention_mask must both be [B, L], got "
                         f"{np.shape(input_ids)} and {np.shape(attention_mask)}")
    _check_padding(attention_mask)
    arch, model_start = batching.model_layout(model)
    if decoder_start_id is None:
        decoder_start_id = model_start if arch == "encoder_decoder" else 0
    graphdef, state = nnx.split(model)
    return _generate(state, input_ids, attention_mask, graphdef=graphdef,
                     max_new_tokens=int(max_new_tokens), eos_id=int(eos_id), pad_id=int(pad_id),
                     decoder_start_id=int(decoder_start_id))


def _check_padding(attention_mask) -> None:
    """Refuses masks that are not a padding layout (holes) when readable here; rows of zeros
    are the filler rows of a fixed-size batch."""
    if isinstance(attention_mask, jax.Array) and not attention_mask.is_fully_addressable:
        return  # built by our own batch code across processes: right-padded by construction
    m = np.asarray(attention_mask) > 0
    runs = np.sum(np.diff(np.pad(m.astype(np.int8), ((0, 0), (1, 1))), axis=1) == 1, axis=1)
    bad = np.flatnonzero(runs > 1)
    if bad.size:
        r = int(bad[0])
        raise ValueError(f"generate: attention_mask row {r} has {int(runs[r])} separate runs of "
                         f"1s; each row must be one contiguous prompt, padded on the left or the "
                         f"right ({bad.size} such rows)")


def prompt_inputs(batch: Mapping[str, np.ndarray], *,
                  encoder_decoder: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` of the prompts of a training-layout batch (host numpy).

    Decoder batches hold prompt + completion; the prompt ends at the position that predicts the
    first target token. Encoder–decoder batches already hold just the prompt in the encoder.
    """
    ids = np.asarray(batch["input_ids"])
    mask = np.asarray(batch["attention_mask"])
    if encoder_decoder:
        return ids, mask
    tmask = np.asarray(batch["target_mask"]) > 0
    length = np.where(tmask.any(axis=1), tmask.argmax(axis=1) + 1, mask.sum(axis=1))
    prompt_mask = (np.arange(ids.shape[1])[None] < length[:, None]).astype(np.int32) * mask
    return ids, prompt_mask


def default_extract_answer(text: str) -> str:
    """The text after the last ``=`` or ``answer is`` (the whole text if neither), stripped."""
    cut = max(text.rfind("="), text.rfind("answer is"))
    if cut < 0:
        return text.strip()
    marker = "=" if text.startswith("=", cut) else "answer is"
    return text[cut + len(marker):].strip().rstrip(".").strip()


# ----------------------------------------------------------------------------------------------
# Batches and evaluation.


@dataclasses.dataclass(frozen=True)
class Batches:
    """Batches by epoch: ``iterate(epoch, start_step)`` yields this process's numpy batches.

    ``iterate`` must be deterministic in ``(epoch, start_step)`` and resume exactly: the batches
    from ``start_step`` on are those an iteration from 0 would give after ``start_step`` steps.
    """

    iterate: Callable[[int, int], Iterable[Mapping[str, np.ndarray]]]
    steps_per_epoch: int


def example_batches(examples: Sequence[Mapping[str, Any]], tokenizer: Any, *, batch_size: int,
                    max_length: int, shuffle: bool, seed: int = 0, encoder_decoder: bool = False,
                    sources: Sequence[str] | None = None, decoder_start_id: int | None = None,
                    drop_remainder: bool = False) -> Batches:
    """:class:`Batches` over example dicts via :func:`jaxgrad.data.batching.batch_iterator`.

    Examples are tokenized once; every process reads its own rows of each global batch.
    """
    from jaxgrad.data import batching

    encoded = batching.encode_examples(examples, tokenizer, sources=sources,
                                       decoder_start_id=decoder_start_id)
    steps = batching.num_batches(len(encoded), batch_size, drop_remainder)
    if steps == 0:
        raise ValueError(f"{len(encoded)} examples make no batch of batch_size={batch_size} "
                         "with drop_remainder=True")

    def iterate(epoch: int, start_step: int):
        return batching.batch_iterator(
            encoded, batch_size=batch_size, max_length=max_length, shuffle=shuffle, seed=seed,
            epoch=epoch, start_step=start_step, drop_remainder=drop_remainder,
            process_index=jax.process_index(), process_count=jax.process_count(),
            arch="encoder_decoder" if encoder_decoder else "decoder")

    return Batches(iterate, steps)


def _to_host(x: jax.Array) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@dataclasses.dataclass
class Evaluator:
    """Validation loss per source, and answer accuracy of greedy generations.

    Attributes:
      batches: validation batches; one pass is ``batches.iterate(0, 0)`` (do not shuffle).
      source_names: names of the batches' ``source_index`` values.
      examples: the examples ``example_index`` refers to (needed for accuracy).
      tokenizer: decodes generations (needed for accuracy).
      extract_answer: answer extractor applied to decoded generations (default
        :func:`default_extract_answer`); examples whose ``answer`` is None are not scored.
      max_new_tokens: generation length; 0 computes losses only.
      prefix: metric name prefix (``val`` or ``test``).
    """

    batches: Batches
    source_names: Sequence[str] = ()
    examples: Sequence[Mapping[str, Any]] | None = None
    tokenizer: Any = None
    extract_answer: Callable[[str], str | None] | None = None
    max_new_tokens: int = 0
    prefix: str = "val"
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.max_new_tokens and (self.tokenizer is None or self.examples is None):
            raise ValueError("Evaluator: accuracy (max_new_tokens > 0) needs tokenizer and "
                             "examples")

    def _eval_fn(self, graphdef, mesh):
        key = (graphdef, mesh)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(functools.partial(eval_step, graphdef),
                                          out_shardings=sharding_lib.replicated(mesh))
        return self._compiled[key]

    def __call__(self, model: nnx.Module, mesh: jax.sharding.Mesh) -> dict[str, float]:
        """Metrics ``{prefix}_loss``, ``{prefix}_loss/<source>`` and, with generation,
        ``{prefix}_acc``, ``{prefix}_acc/<source>`` (sources with answers only)."""
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        fn = self._eval_fn(graphdef, mesh)
        enc_dec = batching.model_layout(model)[0] == "encoder_decoder"
        ce, tok, src, idx, valid, hits = [], [], [], [], [], []
        for batch in self.batches.iterate(0, 0):
            sharded = sharding_lib.shard_batch(dict(batch), mesh)
            out = fn(params, rest, sharded)
            ce.append(_to_host(out["ce_sum"]))
            tok.append(_to_host(out["tokens"]))
            for name, acc in (("source_index", src), ("example_index", idx), ("valid", valid)):
                acc.append(_to_host(sharded[name]))
            if self.max_new_tokens:
                hits.append(self._score(model, batch, mesh, enc_dec, idx[-1], valid[-1]))
        ce, tok, src = np.concatenate(ce), np.concatenate(tok), np.concatenate(src)
        valid = np.concatenate(valid) > 0
        p = self.prefix
        metrics = {f"{p}_loss": float(ce.sum() / max(tok.sum(), 1.0))}
        for s in np.unique(src[valid]):
            rows = valid & (src == s)
            metrics[f"{p}_loss/{self._name(s)}"] = float(ce[rows].sum() / max(tok[rows].sum(), 1.0))
        if self.max_new_tokens:
            hit = np.concatenate(hits)  # 1 correct, 0 wrong, -1 unscored
            scored = valid & (hit >= 0)
            if scored.any():
                metrics[f"{p}_acc"] = float(hit[scored].mean())
                for s in np.unique(src[scored]):
                    rows = scored & (src == s)
                    metrics[f"{p}_acc/{self._name(s)}"] = float(hit[rows].mean())
        return metrics

    def _name(self, s: int) -> str:
        return self.source_names[s] if 0 <= s < len(self.source_names) else str(int(s))

    def _score(self, model, batch, mesh, enc_dec, example_index, valid) -> np.ndarray:
        ids, mask = prompt_inputs(batch, encoder_decoder=enc_dec)
        sharded = sharding_lib.shard_batch({"ids": ids, "mask": mask}, mesh)
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        out = _to_host(generate(model, sharded["ids"], sharded["mask"],
                                max_new_tokens=self.max_new_tokens, eos_id=eos, pad_id=pad))
        extract = self.extract_answer or default_extract_answer
        hit = np.full((out.shape[0],), -1, np.int32)
        for r in range(out.shape[0]):
            if valid[r] <= 0:
                continue
            answer = self.examples[int(example_index[r])].get("answer")
            if answer is None:
                continue
            row = out[r].tolist()
            row = row[:row.index(eos)] if eos in row else row
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            hit[r] = int((extract(text) or "").strip() == str(answer).strip())
        return hit


# ----------------------------------------------------------------------------------------------
# The training loop.


@dataclasses.dataclass
class TrainResult:
    """What :func:`run_training` returns.

    Attributes:
      model: the model, its trainable parameters set to the final values.
      step: optimizer steps done (equal to the total unless stopped by ``stop_after_steps``).
      metrics: the last evaluation's metrics plus ``train_loss`` (mean since the last log).
      best_step: the best checkpoint by ``best_metric`` (None without checkpoints).
      workdir: the run directory.
    """

    model: nnx.Module
    step: int
    metrics: dict[str, float]
    best_step: int | None
    workdir: str


class MetricsLog:
    """Append-only ``metrics.jsonl``, written by process 0 only."""

    def __init__(self, path: str):
        self.path = path
        self.enabled = jax.process_index() == 0

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` (a resumed run redoes those steps and logs them again)."""
        if not (self.enabled and os.path.isfile(self.path)):
            return
        with open(self.path) as f:
            rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(rows)

    def write(self, row: Mapping[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(jsonable(row)) + "\n")


def _opt_shardings(tx, abstract_opt_state, param_shardings, mesh):
    return optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt_state, param_shardings,
        transform_non_params=lambda _: sharding_lib.replicated(mesh),
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def run_training(model: nnx.Module, train: Batches, cfg: TrainConfig, workdir: str, *,
                 evaluator: Evaluator | None = None, mesh: jax.sharding.Mesh | None = None,
                 callback: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train ``model`` on ``train`` batches; resume from ``workdir`` if it holds checkpoints.

    Args:
      model: an NNX model; LoRA mode needs adapters on it. Updated in place at the end.
      train: training batches (each ``batch_size / process_count`` rows on this process).
      cfg: the training config.
      workdir: run directory: ``ckpt/<step>/``, ``metrics.jsonl``.
      evaluator: validation metrics, run every ``eval_every`` steps, at every checkpoint (so each
        checkpoint carries its own metrics for best-checkpoint tracking) and at the end.
      mesh: device mesh (default :func:`jaxgrad.common.sharding.make_mesh` from ``cfg.mesh``).
      callback: ``callback(step, metrics)`` after every step; ``metrics`` are device scalars
        (reading them synchronizes). An exception raised in it stops training (the checkpoints
        written so far stay, as after a crash).

    Returns:
      A :class:`TrainResult`.

    Raises:
      ValueError: inconsistent batch size / mesh / accumulation, a checkpoint from a different
        run layout, or a ``best_metric`` the evaluator does not produce.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig (use TrainConfig.from_config), got "
                        f"{type(cfg).__name__}")
    mesh = mesh or sharding_lib.make_mesh(cfg.mesh.data, cfg.mesh.model)
    data_size = mesh.shape[sharding_lib.DATA_AXIS]
    if cfg.batch_size % (cfg.grad_accum_steps * data_size):
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by grad_accum_steps="
                         f"{cfg.grad_accum_steps} x data axis size {data_size}")
    if train.steps_per_epoch < 1:
        raise ValueError(f"train.steps_per_epoch must be >= 1, got {train.steps_per_epoch}")
    os.makedirs(workdir, exist_ok=True)
    spe = int(train.steps_per_epoch)
    total = cfg.total_steps(spe)
    rules = sharding_lib.rules_from_config(cfg.mesh.rules)

    graphdef, trainable, frozen = split_trainable(model, cfg.full_finetune)
    trainable_sh = sharding_lib.state_shardings(trainable, mesh, rules, fsdp=cfg.mesh.fsdp)
    frozen_sh = sharding_lib.state_shardings(frozen, mesh, rules, fsdp=cfg.mesh.fsdp)
    # A jitted copy: fresh buffers, so donating them never invalidates the caller's model.
    trainable = _place(trainable, trainable_sh)
    trainable = jax.jit(lambda t: jax.tree.map(jnp.copy, t), in_shardings=(trainable_sh,),
                        out_shardings=trainable_sh)(trainable)
    frozen = _place(frozen, frozen_sh)
    tx = make_optimizer(cfg, total)
    schedule = make_schedule(cfg, total)
    opt_sh = _opt_shardings(tx, jax.eval_shape(tx.init, trainable), trainable_sh, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
    repl = sharding_lib.replicated(mesh)
    rng_data = sharding_lib.from_host(jax.random.key_data(jax.random.key(cfg.seed)), repl)
    step = 0
    resumed_metrics: dict[str, float] = {}

    best_metric = cfg.best_metric if evaluator is not None else "train_loss"
    if evaluator is not None and "_acc" in best_metric and not evaluator.max_new_tokens:
        raise ValueError(f"best_metric {best_metric!r} needs generation: set max_new_tokens > 0 "
                         "or choose a loss metric")
    mngr = ckpt_lib.make_manager(os.path.join(workdir, rundir.CKPT_DIR), keep=cfg.keep_checkpoints,
                                 best_metric=best_metric, best_mode=cfg.best_mode,
                                 async_save=cfg.async_checkpoint)
    metrics_log = MetricsLog(os.path.join(workdir, rundir.METRICS_FILE))
    trainable_kind = "full" if cfg.full_finetune else "lora"
    try:
        latest = mngr.latest_step()
        if latest is not None:
            meta = ckpt_lib.read_meta(mngr, latest)
            resumed_metrics = dict(meta.get("metrics") or {})
            if meta.get("trainable") != trainable_kind:
                raise ValueError(f"{workdir}: checkpoint {latest} trained "
                                 f"{meta.get('trainable')!r} parameters, this run trains "
                                 f"{trainable_kind!r}; use a new workdir")
            if meta.get("steps_per_epoch") != spe:
                raise ValueError(f"{workdir}: checkpoint {latest} was written with "
                                 f"{meta.get('steps_per_epoch')} steps per epoch, the data now "
                                 f"gives {spe}: the data or batch size changed; use a new workdir")
            train_state = {"rng": rng_data, "step": jnp.zeros((), jnp.int32)}
            restored = ckpt_lib.restore(
                mngr, latest, params=ckpt_lib.abstract_like(trainable, trainable_sh),
                opt_state=ckpt_lib.abstract_like(opt_state, opt_sh),
                train_state=ckpt_lib.abstract_like(train_state, {"rng": repl, "step": repl}))
            trainable, opt_state = restored["params"], restored["opt_state"]
            rng_data = restored["train_state"]["rng"]
            step = int(restored["train_state"]["step"])
            if step != latest:
                raise ValueError(f"{workdir}: checkpoint {latest} holds step {step}")
            metrics_log.truncate_after(step)
            log.info("resumed from %s at step %d (epoch %d, step %d of the epoch)", workdir, step,
                     step // spe, step % spe)

        step_fn = jax.jit(
            functools.partial(train_step, graphdef, tx=tx, grad_accum_steps=cfg.grad_accum_steps),
            in_shardings=(trainable_sh, frozen_sh, opt_sh, sharding_lib.batch_sharding(mesh), repl),
            out_shardings=(trainable_sh, opt_sh, repl),
            donate_argnums=(0, 2))
        rng = jax.random.wrap_key_data(rng_data)
        start_step = step
        stop_at = min(total, cfg.stop_after_steps) if cfg.stop_after_steps else total
        last_eval: dict[str, float] = {}
        pending: list[dict] = []  # device metrics not fetched yet
        unlogged: list[dict] = []  # host metrics since the last log row
        since_save: list[float] = []  # host losses since the last checkpoint
        train_loss = float("nan")
        last_saved = step

        def fetch():
            nonlocal pending
            host = jax.device_get(pending)
            pending = []
            unlogged.extend(host)
            since_save.extend(float(h["loss"]) for h in host)

        def due(every: int, s: int) -> bool:
            return (s % every == 0) if every > 0 else (s % spe == 0)

        bar = None
        if cfg.progress and jax.process_index() == 0:
            bar = progress_bar(total=total, initial=step,
                               desc=os.path.basename(os.path.normpath(workdir)),
                               dynamic_ncols=True)
        t0 = time.time()
        while step < stop_at:
            epoch, start = divmod(step, spe)
            before = step
            for batch in train.iterate(epoch, start):
                batch = sharding_lib.shard_batch(dict(batch), mesh)
                trainable, opt_state, m = step_fn(trainable, frozen, opt_state, batch,
                                                  jax.random.fold_in(rng, step))
                step += 1
                pending.append(m)
                if callback is not None:
                    callback(step, m)
                if bar is not None:
                    bar.update(1)
                final = step == stop_at
                if step % cfg.log_every == 0 or final:
                    fetch()
                    train_loss = float(np.mean([float(h["loss"]) for h in unlogged]))
                    metrics_log.write({
                        "step": step, "epoch": step / spe, "train_loss": train_loss,
                        "grad_norm": float(np.mean([float(h["grad_norm"]) for h in unlogged])),
                        "learning_rate": float(schedule(step - 1)),
                        "seconds": round(time.time() - t0, 3)})
                    unlogged.clear()
                    if bar is not None:
                        bar.set_postfix(loss=f"{train_loss:.4f}", refresh=False)  # drawn by update()
                save_now = due(cfg.save_every, step) or final
                if evaluator is not None and (due(cfg.eval_every, step) or save_now):
                    last_eval = evaluator(nnx.merge(graphdef, trainable, frozen), mesh)
                    metrics_log.write({"step": step, "epoch": step / spe, **last_eval})
                    log.info("step %d: %s", step, _short(last_eval))
                if save_now and step != last_saved:
                    fetch()
                    metrics = {"train_loss": float(np.mean(since_save)), **last_eval}
                    if best_metric not in metrics:
                        raise ValueError(f"best_metric {best_metric!r} is not among the metrics "
                                         f"{sorted(metrics)}")
                    ckpt_lib.save(mngr, step, params=trainable, opt_state=opt_state,
                                  train_state={"rng": rng_data,  # global arrays (multi-host)
                                               "step": sharding_lib.from_host(
                                                   np.asarray(step, np.int32), repl)},
                                  meta={"step": step, "epoch": step // spe,
                                        "step_in_epoch": step % spe, "steps_per_epoch": spe,
                                        "trainable": trainable_kind, "metrics": metrics,
                                        "config": dataclasses.asdict(cfg)},
                                  metrics=metrics)
                    last_saved = step
                    since_save.clear()
                if final:
                    break
            if step == before:
                raise RuntimeError(f"train.iterate({epoch}, {start}) yielded no batch although "
                                   f"{spe} steps per epoch were announced")
        if bar is not None:
            bar.close()
        mngr.wait_until_finished()
        best = mngr.best_step()
    finally:
        mngr.close()
    nnx.update(model, trainable, frozen)
    metrics = {"train_loss": train_loss, **last_eval}
    if step == start_step and resumed_metrics:  # resumed at the end: nothing ran, report the
        metrics = resumed_metrics                # metrics saved with that checkpoint
    return TrainResult(model=model, step=step, metrics=metrics, best_step=best, workdir=workdir)


def _short(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "/" not in k)


def fit(model: nnx.Module, tokenizer: Any, train_examples: Sequence[Mapping[str, Any]],
        cfg: TrainConfig, workdir: str, *,
        val_examples: Sequence[Mapping[str, Any]] | None = None,
        sources: Sequence[str] | None = None,
        extract_answer: Callable[[str], str | None] | None = None,
        mesh: jax.sharding.Mesh | None = None,
        callback: Callable[[int, dict], None] | None = None) -> TrainResult:
    """:func:`run_training` on example dicts (``example_id, source, prompt, completion, answer``).

    Args:
      model: the model (with LoRA adapters unless ``cfg.full_finetune``).
      tokenizer: a Hugging Face tokenizer with an eos token.
      train_examples: training examples, shuffled per epoch with ``cfg.seed``.
      cfg: the training config.
      workdir: the run directory.
      val_examples: validation examples (loss per source; accuracy when ``cfg.max_new_tokens``).
      sources: source names in the order metrics should index them (default: sorted names).
      extract_answer: answer extractor for accuracy (default :func:`default_extract_answer`).
      mesh: device mesh (default from ``cfg.mesh``).
      callback: see :func:`run_training`.
    """
    arch, start = batching.model_layout(model)
    enc_dec = arch == "encoder_decoder"
    every = list(train_examples) + list(val_examples or [])
    sources = list(sources) if sources is not None else sorted({e["source"] for e in every})
    train = example_batches(train_examples, tokenizer, batch_size=cfg.batch_size,
                            max_length=cfg.max_length, shuffle=True, seed=cfg.seed,
                            encoder_decoder=enc_dec, sources=sources, decoder_start_id=start)
    evaluator = None
    if val_examples:
        evaluator = make_evaluator(model, tokenizer, val_examples, cfg, sources=sources,
                                   extract_answer=extract_answer)
    return run_training(model, train, cfg, workdir, evaluator=evaluator, mesh=mesh,
                        callback=callback)


def make_evaluator(model: nnx.Module, tokenizer: Any, examples: Sequence[Mapping[str, Any]],
                   cfg: TrainConfig, *, sources: Sequence[str],
                   extract_answer: Callable[[str], str | None] | None = None,
                   prefix: str = "val") -> Evaluator:
    """An :class:`Evaluator` over example dicts, batched like training but not shuffled."""
    arch, start = batching.model_layout(model)
    enc_dec = arch == "encoder_decoder"
    examples = list(examples)
    batches = example_batches(examples, tokenizer, batch_size=cfg.eval_batch_size or cfg.batch_size,
                              max_length=cfg.max_length, shuffle=False, encoder_decoder=enc_dec,
                              sources=sources, decoder_start_id=start)
    return Evaluator(batches, source_names=list(sources), examples=examples, tokenizer=tokenizer,
                     extract_answer=extract_answer, max_new_tokens=cfg.max_new_tokens,
                     prefix=prefix)


def save_adapter(model: nnx.Module, workdir: str, *,
                 base_model_name_or_path: str | None = None) -> str | None:
    """Export the LoRA adapters as a PEFT adapter in ``<workdir>/adapter``; its path.

    Returns None (and writes nothing) when the model has no adapters or on processes other than 0.
    ``peft.PeftModel.from_pretrained(torch_model, path)`` loads it.
    """
    from jaxgrad.models import save_peft_adapter

    if jax.process_index() != 0 or not jax.tree.leaves(nnx.state(model, nnx.LoRAParam)):
        return None
    path = os.path.join(workdir, rundir.ADAPTER_DIR)
    save_peft_adapter(model, path, base_model_name_or_path=base_model_name_or_path)
    return path


# ----------------------------------------------------------------------------------------------
# Stages driven by a config (the boundary where ml_collections becomes typed dataclasses).


def lora_from_config(section: Any):
    """A ``LoraConfig`` from ``config.lora`` (``rank == 0`` means no adapters: returns None)."""
    from jaxgrad.models import LoraConfig

    fields = as_fields(section, LoraConfig, "lora")
    if int(fields.get("rank", 1)) == 0:
        return None
    targets = fields.get("target_modules")
    if targets in ("", ()):
        fields["target_modules"] = None
    return LoraConfig(**fields)


def load_model(spec: ModelSpec, lora: Any = None):
    """``(model, tokenizer)`` for a :class:`ModelSpec`; LoRA adapters when ``lora`` is given."""
    from jaxgrad.models import apply_lora, build_model, load_pretrained
    from jaxgrad.models.hub import FAMILIES, family_classes

    if spec.name_or_path:
        model, tokenizer = load_pretrained(spec.name_or_path, dtype=spec.dtype,
                                           param_dtype=spec.param_dtype, lora=lora,
                                           with_tokenizer=not spec.tokenizer)
    else:
        if spec.family not in FAMILIES:
            raise ValueError(f"model.family must be one of {sorted(FAMILIES)}, got {spec.family!r}")
        if not spec.scratch:
            raise ValueError("model: give name_or_path, or the `scratch` config fields of a "
                             "from-scratch model")
        config = family_classes(spec.family)[0](**dict(spec.scratch), dtype=jnp.dtype(spec.dtype),
                                                param_dtype=jnp.dtype(spec.param_dtype))
        model, tokenizer = build_model(config, seed=spec.seed), None
        if lora is not None:
            apply_lora(model, lora)
    if spec.tokenizer == "char":
        from jaxgrad.data import build_char_tokenizer

        tokenizer = build_char_tokenizer()
    elif spec.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer)
    if tokenizer is None:
        raise ValueError(f"model {spec.name_or_path or spec.family!r} has no tokenizer; set "
                         "model.tokenizer ('char' or a tokenizer directory)")
    return model, tokenizer


def _place(tree, shardings):
    """``jax.device_put(tree, shardings)``, also across processes: with several processes a
    leaf that this process holds whole (the same value on every process, e.g. restored onto
    one device) becomes a global array from its host copy, and a global leaf is resharded by a
    jitted identity (device_put cannot move data between hosts)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x if x.sharding == sharding else jax.jit(lambda a: a,
                                                            out_shardings=sharding)(x)
        return sharding_lib.from_host(x, sharding)

    return jax.tree.map(one, tree, shardings)


def _save_config(config: Any, run_dir: str) -> None:
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
    _save_config(config, run_dir)
    result = fit(model, tokenizer, data.examples("train"), cfg, run_dir,
                 val_examples=data.examples("validation"), sources=data.sources,
                 extract_answer=data.extract_answer if data.answer_format else None)
    save_adapter(result.model, run_dir, base_model_name_or_path=spec.name_or_path or None)
    return result


def finetune_run_name(sources: Sequence[str]) -> str:
    """A directory name for a fine-tune on ``sources`` when ``finetune.name`` is empty.

    The names joined by ``+`` when that is a plain, unambiguous file name (letters, digits,
    ``-_.`` and no ``+`` inside a name); otherwise a slug of them plus 8 hex digits of the SHA-1
    of their JSON list, so two different lists never share a directory and a name like
    ``q&a/v2`` never becomes a path. The exact list is in the run's ``sources.json``.
    """
    sources = [str(s) for s in sources]
    plain = all(re.fullmatch(r"[A-Za-z0-9_.-]+", s) and s not in (".", "..") for s in sources)
    joined = "+".join(sources)
    if plain and len(joined) <= 120:
        return joined
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", joined).strip("._")[:60] or "sources"
    digest = hashlib.sha1(json.dumps(sources).encode("utf-8")).hexdigest()[:8]
    return f"{slug}-{digest}"


def finetune_sources(section: Any, available: Sequence[str]) -> list[str]:
    """The sources ``config.finetune`` names: ``sources`` or ``selection_file``.

    ``sources`` is a list, a JSON list in a string (``'["a,b", "c++"]'``: names may hold any
    character) or comma-separated names (``"a,b"``, for names without commas); ``selection_file``
    is a JSON list, a JSON object with a "selected" list (the selection stage's
    ``selection/selection.json``) or else a "sources" list, or one name per line.

    Raises:
      ValueError: both or neither given; a name not among ``available``; a malformed JSON list.
    """
    d = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    names = d.get("sources") or []
    if isinstance(names, str) and names.lstrip().startswith("["):
        try:
            names = json.loads(names)
        except json.JSONDecodeError as e:
            raise ValueError(f"config.finetune.sources: {names!r} starts like a JSON list but is "
                             f"not one ({e})") from None
        if not isinstance(names, list) or not all(isinstance(s, str) for s in names):
            raise ValueError("config.finetune.sources: a JSON value must be a list of names")
    elif isinstance(names, str):
        names = [s.strip() for s in names.split(",") if s.strip()]
    path = d.get("selection_file") or ""
    if path:
        if names:
            raise ValueError("config.finetune: give sources or selection_file, not both")
        with open(path) as f:
            text = f.read()
        try:
            raw = json.loads(text)
            if isinstance(raw, Mapping):
                key = "selected" if "selected" in raw else "sources"
                if key not in raw:
                    raise ValueError(f"config.finetune.selection_file {path}: a JSON object needs "
                                     "a 'selected' or 'sources' list of source names")
                names = raw[key]
            else:
                names = raw
        except json.JSONDecodeError:
            names = [line.strip() for line in text.splitlines() if line.strip()]
    names = list(names)
    if not names:
        raise ValueError("config.finetune names no sources (set finetune.sources=a,b or "
                         "finetune.selection_file)")
    unknown = [s for s in names if s not in available]
    if unknown:
        hint = ""
        if not d.get("groups_file") and any(re.fullmatch(r"c\d{2,}", s) for s in unknown):
            hint = (" (clusters of a pipeline run are units of its groups record: set "
                    "finetune.groups_file=<workdir>/groups/groups.json)")
        raise ValueError(f"config.finetune: unknown sources {unknown}; available: "
                         f"{list(available)}{hint}")
    return names


def _choice_metrics(model, tokenizer, data, cfg: TrainConfig, *, prefix: str) -> dict[str, float]:
    """``{prefix}_choice_acc``: likelihood accuracy over the target's closed answer set
    (:mod:`jaxgrad.choices`) on its ``prefix`` split; empty when the target's answers are open."""
    from jaxgrad.choices import choice_accuracy, target_choices

    choices = target_choices(data)
    if choices is None:
        return {}
    acc, _ = choice_accuracy(model, tokenizer, data.examples(prefix, [data.target]), choices,
                             sources=data.sources, max_length=cfg.max_length,
                             batch_size=cfg.eval_batch_size or cfg.batch_size)
    return {f"{prefix}_choice_acc": acc}


def finetune(config: Any, workdir: str) -> TrainResult:
    """Final stage: fine-tune the *base* model (fresh adapters) on the selected sources.

    Trains on the train splits of ``config.finetune.sources`` (with ``finetune.groups_file``,
    a groups record of the pipeline: on the train samples of the units named, clusters or
    sources), validates on the target's validation split (the selected sources' when there is
    no target), evaluates the target's test
    split at the end (``test_*`` metrics, also in ``metrics.jsonl``). Output: ``<workdir>/
    finetune/<name>/`` with ``name`` = ``config.finetune.name`` or
    :func:`finetune_run_name` of the sources.
    """
    cfg = TrainConfig.from_config(config.train, config.mesh)
    initialize_distributed(cfg.distributed)
    describe_devices()
    spec = ModelSpec.from_config(config.model)
    data = load_data(config.data)
    groups_file = config.finetune.get("groups_file", "") or ""
    if groups_file:  # names are units of a groups record: clusters of samples, or sources
        from jaxgrad.groups.units import Units

        units = Units.from_file(groups_file)
    else:
        units = None
    selected = finetune_sources(config.finetune, units.names if units else data.sources)
    train_examples = (units.examples(data, "train", selected) if units
                      else data.examples("train", selected))
    name = config.finetune.name or finetune_run_name(selected)
    if name in (".", "..") or "/" in name or os.sep in name:
        raise ValueError(f"config.finetune.name={name!r} must be one directory name under "
                         f"{workdir}/finetune (no '/', not '.' or '..')")
    run_dir = rundir.finetune_dir(workdir, name)
    # Before anything is loaded or written: a run made with other settings is refused by name
    # (or deleted with pipeline.on_config_change = "rerun"), never silently resumed or returned.
    mode = str((config.get("pipeline") or {}).get("on_config_change", "error") or "error")
    check_finetune_run(run_dir, finetune_run_values(config, workdir, selected,
                                                    [e["example_id"] for e in train_examples]),
                       mode)
    model, tokenizer = load_model(spec, lora_from_config(config.lora))
    _save_config(config, run_dir)
    trained_on = {e["source"] for e in train_examples}
    eval_sources = [data.target] if data.target else [s for s in data.sources if s in trained_on]
    extract = data.extract_answer if data.answer_format else None
    result = fit(model, tokenizer, train_examples, cfg, run_dir,
                 val_examples=data.examples("validation", eval_sources), sources=data.sources,
                 extract_answer=extract)
    if data.target and data.n("test", data.target) > 0:  # data.files.test = 0: no test split
        test = make_evaluator(result.model, tokenizer, data.target_examples("test"), cfg,
                              sources=data.sources, extract_answer=extract, prefix="test")
        mesh = sharding_lib.make_mesh(cfg.mesh.data, cfg.mesh.model)
        test_metrics = test(result.model, mesh)
        test_metrics.update(_choice_metrics(result.model, tokenizer, data, cfg, prefix="test"))
        MetricsLog(os.path.join(run_dir, rundir.METRICS_FILE)).write({"step": result.step, **test_metrics})
        result.metrics.update(test_metrics)
    save_adapter(result.model, run_dir, base_model_name_or_path=spec.name_or_path or None)
    if jax.process_index() == 0:
        with open(os.path.join(run_dir, rundir.SOURCES_FILE), "w") as f:
            json.dump({"sources": selected, "n_train": len(train_examples),
                       "metrics": result.metrics}, f, indent=1)
    barrier(f"finetune/{name}")  # the other processes read sources.json next
    return result


__getattr__ = moved_names(__name__)  # names that moved out of this module (jaxgrad._compat)
