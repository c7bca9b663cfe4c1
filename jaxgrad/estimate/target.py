"""The target side of the estimates: the target's validation examples as one batch, the per-sample
outputs ``f`` (``gradients.output_fn``) of a model on them, and the target metric the
estimates table's ``loss`` column holds, as a function of those outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrad.data.batching import collate
from jaxgrad.gradients.outputs import get_output_fn, outputs_loss
from jaxgrad.models.forward import encode_for_model, model_logits


def target_metric(output_fn: str):
    """The table's ``loss`` column as a function of per-sample outputs f (outputs.outputs_loss)."""
    return lambda f: float(outputs_loss(np.asarray(f, np.float64), output_fn))


def target_outputs(config, data, model, tokenizer, graphdef, rest):
    """``(examples, f)``: the target's validation examples and the jitted per-sample outputs
    ``f(params) -> [J]`` (``gradients.output_fn``) of the model ``graphdef`` + ``params`` + ``rest``."""
    out_fn = get_output_fn(str(config.gradients.output_fn), float(config.gradients.eps))
    examples = data.target_examples()
    enc, arch = encode_for_model(examples, tokenizer, model, sources=data.sources)
    batch = collate(enc, list(range(len(examples))), max_length=int(config.train.max_length), arch=arch)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    @jax.jit
    def f(params):
        logits = model_logits(nnx.merge(graphdef, params, rest), batch)
        return out_fn(logits, batch["targets"], batch["target_mask"])

    return examples, f
