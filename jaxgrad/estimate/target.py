"""The target side of the estimates: the target's validation examples as one batch
(:func:`target_batch`), the per-sample outputs ``f`` (``gradients.output_fn``) of a model on them
(:func:`target_outputs_fn`, jitted: :func:`target_outputs`), and the target metric the estimates
table's ``loss`` column holds, of those outputs (:func:`target_metric`; traced:
:func:`target_loss_fn`). The exact estimates, fidelity and the first-order test all use them."""

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


def target_batch(config, data, model, tokenizer) -> tuple[list[dict], dict[str, jax.Array]]:
    """``(examples, batch)``: the target's validation examples and all of them as one batch for
    ``model`` (``train.max_length`` tokens), as device arrays."""
    examples = data.target_examples()
    enc, arch = encode_for_model(examples, tokenizer, model, sources=data.sources)
    batch = collate(enc, list(range(len(examples))), max_length=int(config.train.max_length), arch=arch)
    return examples, {k: jnp.asarray(v) for k, v in batch.items()}


def target_outputs_fn(config, graphdef, rest, batch):
    """``f(params) -> [J]``: the per-sample outputs (``gradients.output_fn``) on ``batch`` of the
    model ``graphdef`` + ``params`` + ``rest`` (traceable, not jitted)."""
    out_fn = get_output_fn(str(config.gradients.output_fn), float(config.gradients.eps))

    def f(params):
        logits = model_logits(nnx.merge(graphdef, params, rest), batch)
        return out_fn(logits, batch["targets"], batch["target_mask"])
    return f


def target_loss_fn(config, graphdef, rest, batch):
    """``loss(params)``: the table's ``loss`` metric (``outputs.outputs_loss``) of
    :func:`target_outputs_fn`'s outputs, traceable (the exact estimates vmap it)."""
    f = target_outputs_fn(config, graphdef, rest, batch)
    output = str(config.gradients.output_fn)
    return lambda params: outputs_loss(f(params), output)


def target_outputs(config, data, model, tokenizer, graphdef, rest):
    """``(examples, f)``: the target's validation examples and the jitted per-sample outputs
    ``f(params) -> [J]`` (``gradients.output_fn``) of the model ``graphdef`` + ``params`` + ``rest``."""
    examples, batch = target_batch(config, data, model, tokenizer)
    return examples, jax.jit(target_outputs_fn(config, graphdef, rest, batch))
