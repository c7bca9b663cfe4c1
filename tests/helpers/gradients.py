"""Helpers shared by the gradient and estimate tests: the one-example-at-a-time reference for
per-sample gradients, and the small inputs of a gradient store computation (also imported by
the worker processes of tests/gradients/test_compute.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helpers import fixture
from jaxgrad.common.flat import flatten
from jaxgrad.data.synthetic import SyntheticSpec, synthetic_sources
from jaxgrad.gradients.outputs import get_output_fn
from jaxgrad.gradients.per_sample import num_trainable
from jaxgrad.gradients.projection import Projector
from jaxgrad.models import LoraConfig, load_pretrained
from jaxgrad.models.forward import model_logits
from jaxgrad.models.layers import named_variables


def one_at_a_time(model, batch, output_fn, full_finetune=False):
    """Reference: jax.grad on each example alone (batch of one), flattened, no vmap."""
    filt = nnx.Param if full_finetune else nnx.LoRAParam
    graphdef, params, rest = nnx.split(model, filt, ...)
    fn = get_output_fn(output_fn)

    def f(p, ex):
        logits = model_logits(nnx.merge(graphdef, p, rest), ex)
        return fn(logits, ex["targets"], ex["target_mask"])[0]

    grads, vals = [], []
    n = batch["input_ids"].shape[0]
    value_and_grad = jax.jit(jax.value_and_grad(f))  # one example at a time: no vmap anywhere
    for i in range(n):
        ex = {k: jnp.asarray(v[i : i + 1]) for k, v in batch.items()}
        v, g = value_and_grad(params, ex)
        grads.append(np.asarray(flatten(g)))
        vals.append(float(v))
    return np.stack(grads), np.array(vals)


# ---- a gradient store of the tiny Llama fixture on two synthetic sources -------------------------

SPEC = SyntheticSpec(tasks=("add", "copy"), noisy=("add",), unrelated=1, n_train=6, n_validation=2,
                     n_test=2, seed=0)
STORE_KW = dict(split="train", batch_size=4, chunk_size=2, max_length=48, shard_size=5)


def store_inputs():
    """(model, tokenizer, data, train examples, projector): the inputs of
    ``compute_gradient_store(..., **STORE_KW)``."""
    model, tok = load_pretrained(fixture("tiny-llama"), lora=LoraConfig(rank=2, seed=1))
    for name, var in named_variables(model).items():
        if name.endswith("lora_B"):
            var[...] = var[...] + 0.05  # a nonzero adapter: every LoRA gradient informative
    data = synthetic_sources(SPEC)
    examples = data.examples("train")
    proj = Projector(seed=5, dim=num_trainable(model), k=8)
    return model, tok, data, examples, proj
