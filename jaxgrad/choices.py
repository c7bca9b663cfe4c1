"""Multiple-choice accuracy by likelihood: which answer does the model find most probable?

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

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

MAX_CHOICES = 10


def answer_choices(examples: Sequence[Mapping[str, Any]], max_choices: int = MAX_CHOICES
                   ) -> tuple[str, ...] | None:
    """The sorted distinct ``answer`` values of ``examples`` when they form a closed set.

    None when an example has no answer, or when there are fewer than 2 or more than
    ``max_choices`` distinct answers (an open-ended task: use exact match instead).
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
    (a ``MultiSourceData``), so a split missing one answer still gets the whole set."""
    return answer_choices([e for split in ("train", "validation", "test")
                           for e in data.target_examples(split)])


def choice_log_likelihoods(model: Any, tokenizer: Any, examples: Sequence[Mapping[str, Any]],
                           choices: Sequence[str], *, sources: Sequence[str], max_length: int,
                           batch_size: int = 16) -> np.ndarray:
    """``log p(choice | prompt)`` of every example and choice: float64 ``[N, C]`` (nats).

    Raises:
      ValueError: ``choices`` is empty.
    """
    from jaxgrad.data.batching import collate, encode_for_model
    from jaxgrad.losses import model_logits

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
