"""Last-layer representations of examples, for the representation-similarity baseline.

The baseline ranks sources by the cosine between each source's mean representation and the
target's (the representation-similarity selector GradEx is compared with, Li et al., EMNLP 2024;
RDS in the data-selection literature). An example's representation is the mean over its real
tokens of the model's last hidden state (after the final norm, before the LM head;
:func:`jaxgrad.models.forward.last_hidden_states`):

* decoders (``LlamaForCausalLM`` and the families built on it): every token of BOS + prompt +
  completion + EOS, i.e. the positions where ``attention_mask`` is 1;
* encoder–decoders (T5): the encoder's output over the input tokens (the prompt), as sentence
  embeddings from T5 are usually taken.

The cosines of the source means are :func:`jaxgrad.select.baselines.gradient_similarity_scores` applied
to these features (the same arithmetic as the gradient-similarity baseline).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrad.data.batching import collate
from jaxgrad.models.forward import encode_for_model, last_hidden_states


def mean_representations(model: Any, tokenizer: Any, examples: Sequence[Mapping[str, Any]], *,
                         sources: Sequence[str], max_length: int, batch_size: int = 16
                         ) -> np.ndarray:
    """Mean last hidden state of each example: float32 ``[N, H]``, in the order of ``examples``.

    Args:
      model: a jaxgrad model (LoRA adapters, if any, are applied as they are).
      tokenizer: its tokenizer.
      examples: example dicts (prompt, completion, source).
      sources: the source list of the data (``MultiSourceData.sources``).
      max_length: truncation length in tokens (``train.max_length``), as in training.
      batch_size: examples per forward pass (the result does not depend on it).
    """
    examples = list(examples)
    enc, arch = encode_for_model(examples, tokenizer, model, sources=sources)
    graphdef, state = nnx.split(model)

    @jax.jit
    def pooled(state, batch):
        h, mask = last_hidden_states(nnx.merge(graphdef, state), batch)
        m = mask.astype(jnp.float32)[..., None]
        return (h * m).sum(1) / jnp.maximum(m.sum(1), 1.0)

    out = np.zeros((len(examples), 0), np.float32)
    parts = []
    for lo in range(0, len(examples), batch_size):
        rows = list(range(lo, min(lo + batch_size, len(examples))))
        batch = collate(enc, rows, max_length=max_length, arch=arch, batch_size=batch_size)
        fields = ("input_ids", "attention_mask")
        parts.append(np.asarray(pooled(state, {k: jnp.asarray(batch[k]) for k in fields}))[:len(rows)])
    return np.concatenate(parts, 0).astype(np.float32) if parts else out
