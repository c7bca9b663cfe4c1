"""Evaluation: validation loss per source, exact-match accuracy of greedy generations, and
multiple-choice accuracy by likelihood.

:class:`Evaluator` computes the validation loss, overall and per source (token-weighted mean
cross-entropy), and the exact-match accuracy of greedy generations
(:func:`jaxgrad.train.generation.generate`) where examples carry an ``answer``.

Multiple-choice accuracy by likelihood: which answer does the model find most probable?

For a source whose examples have a small closed set of answers (StrategyQA: "Yes" / "No"), each
example is scored by the log-likelihood of every candidate answer written as the completion
after the example's prompt, ``log p(answer tokens | prompt)`` summed over the answer's tokens
(BIG-bench's ``multiple_choice_grade``; lm-evaluation-harness's ``acc``). The prediction is the
candidate of highest likelihood; the accuracy is the fraction of examples whose prediction is
their ``answer``. Unlike the exact match of a greedy generation, it does not depend on the form
of the generated text ("Yes, because", "yes"), which for a small model is often what decides.

The candidate is tokenized after the prompt as the training completions are (prompt and
completion tokenized separately, then joined), and only the candidate's own tokens are scored:
the EOS the batching appends after a completion is not, since in the data the answer is followed
by a rationale, not by the end of the text.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jaxgrad.common import sharding as sharding_lib
from jaxgrad.config import TrainConfig
from jaxgrad.data.batching import collate
from jaxgrad.models.forward import (encode_for_model, is_encoder_decoder, model_layout,
                                    model_logits)
from jaxgrad.models.lora import split_trainable
from jaxgrad.train.batches import Batches, example_batches
from jaxgrad.train.generation import default_extract_answer, generate, prompt_inputs
from jaxgrad.train.step import eval_step

MAX_CHOICES = 10


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
        graphdef, params, rest = split_trainable(model, full_finetune=True)  # every Param
        fn = self._eval_fn(graphdef, mesh)
        enc_dec = is_encoder_decoder(model)
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


def make_evaluator(model: nnx.Module, tokenizer: Any, examples: Sequence[Mapping[str, Any]],
                   cfg: TrainConfig, *, sources: Sequence[str],
                   extract_answer: Callable[[str], str | None] | None = None,
                   prefix: str = "val") -> Evaluator:
    """An :class:`Evaluator` over example dicts, batched like training but not shuffled.

    Args:
      model: the NNX model (its layout picks decoder or encoder–decoder batches).
      tokenizer: the model's tokenizer.
      examples: the example dicts to evaluate (``answer`` enables exact match).
      cfg: the ``train`` config (``eval_batch_size`` or ``batch_size``, ``max_length``,
        ``max_new_tokens``).
      sources: source names, in the order ``source_index`` refers to (per-source metrics).
      extract_answer: text -> answer for exact match (default: the Evaluator's).
      prefix: the metric name prefix (``"val"`` gives ``val_loss``, ...).

    Returns:
      The :class:`Evaluator`.

    Raises:
      ValueError: no batch can be made (:func:`example_batches`).
    """
    arch, start = model_layout(model)
    enc_dec = arch == "encoder_decoder"
    examples = list(examples)
    batches = example_batches(examples, tokenizer, batch_size=cfg.eval_batch_size or cfg.batch_size,
                              max_length=cfg.max_length, shuffle=False, encoder_decoder=enc_dec,
                              sources=sources, decoder_start_id=start)
    return Evaluator(batches, source_names=list(sources), examples=examples, tokenizer=tokenizer,
                     extract_answer=extract_answer, max_new_tokens=cfg.max_new_tokens,
                     prefix=prefix)


def answer_choices(examples: Sequence[Mapping[str, Any]], max_choices: int = MAX_CHOICES
                   ) -> tuple[str, ...] | None:
    """The sorted distinct ``answer`` values of ``examples`` when they form a closed set.

    None when an example has no answer, or when there are fewer than 2 or more than
    ``max_choices`` distinct answers (an open-ended task: use exact match instead).

    Args:
      examples: example dicts; their ``answer`` values are compared stripped, as strings.
      max_choices: the most distinct answers that still count as a closed set.

    Returns:
      The sorted tuple of distinct answers (str), or None.
    """
    answers = [e.get("answer") for e in examples]
    if not answers or any(a is None or str(a).strip() == "" for a in answers):
        return None
    distinct = sorted({str(a).strip() for a in answers})
    if not 2 <= len(distinct) <= max_choices:
        return None
    return tuple(distinct)


def target_choices(data) -> tuple[str, ...] | None:
    """:func:`answer_choices` of the target's examples over every split of ``data``
    (a ``MultiSourceData``), so a split missing one answer still gets the whole set.

    Args:
      data: a ``MultiSourceData`` (its ``target_examples(split)`` of train, validation, test).

    Returns:
      The sorted answers (str), or None for an open-ended target.
    """
    return answer_choices([e for split in ("train", "validation", "test")
                           for e in data.target_examples(split)])


def choice_log_likelihoods(model: Any, tokenizer: Any, examples: Sequence[Mapping[str, Any]],
                           choices: Sequence[str], *, sources: Sequence[str], max_length: int,
                           batch_size: int = 16) -> np.ndarray:
    """``log p(choice | prompt)`` of every example and choice: float64 ``[N, C]`` (nats).

    The sum of the choice's token log-probabilities (its EOS excluded), from one forward pass
    per batch of (example, choice) pairs, the prompt being the example's.

    Args:
      model: the NNX model (decoder or encoder–decoder).
      tokenizer: the model's tokenizer.
      examples: N example dicts (their ``completion`` is replaced by each choice).
      choices: C candidate answers (str()-converted).
      sources: source names, in the order ``source_index`` refers to.
      max_length: truncation length in tokens.
      batch_size: (example, choice) pairs per forward pass (one compiled shape).

    Raises:
      ValueError: ``choices`` is empty.
    """
    choices = [str(c) for c in choices]
    if not choices:
        raise ValueError("choice_log_likelihoods: choices is empty")
    examples = list(examples)
    cands = [{**e, "completion": c} for e in examples for c in choices]
    enc, arch = encode_for_model(cands, tokenizer, model, sources=sources)
    n_tok = np.array([len(c) for c in enc.completions], np.float32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def scores(state, batch, n_tok):
        logits = model_logits(nnx.merge(graphdef, state), batch)
        logp = jax.nn.log_softmax(logits, axis=-1)
        tok = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        mask = batch["target_mask"]
        keep = mask * (jnp.cumsum(mask, axis=1) <= n_tok[:, None])  # the choice's tokens, no EOS
        return (tok * keep).sum(1)

    out = []
    for lo in range(0, len(cands), batch_size):
        rows = list(range(lo, min(lo + batch_size, len(cands))))
        batch = collate(enc, rows, max_length=max_length, arch=arch, batch_size=batch_size)
        nt = np.zeros(batch_size, np.float32)
        nt[:len(rows)] = n_tok[rows]
        batch = {k: jnp.asarray(v) for k, v in batch.items()
                 if k not in ("example_index", "source_index", "valid")}
        out.append(np.asarray(scores(state, batch, jnp.asarray(nt)), np.float64)[:len(rows)])
    return np.concatenate(out).reshape(len(examples), len(choices))


def choice_accuracy(model: Any, tokenizer: Any, examples: Sequence[Mapping[str, Any]],
                    choices: Sequence[str], *, sources: Sequence[str], max_length: int,
                    batch_size: int = 16) -> tuple[float, np.ndarray]:
    """``(accuracy, correct [N] bool)``: the most likely choice equals the example's answer.

    Args:
      model, tokenizer, examples, choices, sources, max_length, batch_size: as
        :func:`choice_log_likelihoods`; each example's ``answer`` (stripped) must be a choice.

    Returns:
      ``(accuracy, correct)``: a float in [0, 1] and an [N] bool array (argmax over choices;
      ties go to the first choice).

    Raises:
      ValueError: an example's answer is not one of ``choices``.
    """
    choices = [str(c) for c in choices]
    bad = [e.get("answer") for e in examples if str(e.get("answer", "")).strip() not in choices]
    if bad:
        raise ValueError(f"choice_accuracy: answers {sorted(set(map(str, bad)))[:5]} are not among "
                         f"the choices {choices}")
    ll = choice_log_likelihoods(model, tokenizer, examples, choices, sources=sources,
                                max_length=max_length, batch_size=batch_size)
    gold = np.array([choices.index(str(e["answer"]).strip()) for e in examples])
    correct = ll.argmax(1) == gold
    return float(correct.mean()), correct


def choice_metrics(model, tokenizer, data, cfg: TrainConfig, *, prefix: str) -> dict[str, float]:
    """``{prefix}_choice_acc``: likelihood accuracy over the target's closed answer set
    (:func:`choice_accuracy`) on its ``prefix`` split; empty when the target's answers are open."""
    choices = target_choices(data)
    if choices is None:
        return {}
    acc, _ = choice_accuracy(model, tokenizer, data.examples(prefix, [data.target]), choices,
                             sources=data.sources, max_length=cfg.max_length,
                             batch_size=cfg.eval_batch_size or cfg.batch_size)
    return {f"{prefix}_choice_acc": acc}
