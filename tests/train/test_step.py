"""jaxgrad.train.step (loss_and_grads): gradient accumulation equals one big batch; bfloat16
compute keeps the adapters and their gradients in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers.training import LLAMA, LLAMA_TARGETS, tiny_data, tiny_model
from jaxgrad.common import sharding as sharding_lib
from jaxgrad.config import ModelSpec
from jaxgrad.models import LoraConfig
from jaxgrad.models.loading import load_model
from jaxgrad.models.lora import split_trainable
from jaxgrad.train import example_batches, loss_and_grads


def test_grad_accumulation_equals_one_big_batch():
    d = tiny_data()
    model, tok = tiny_model()
    batches = example_batches(d.examples("train"), tok, batch_size=8, max_length=32, shuffle=True)
    batch = {k: jnp.asarray(v) for k, v in next(iter(batches.iterate(0, 0))).items()}
    per_micro = np.asarray(batch["target_mask"]).sum(1).reshape(2, 4).T.sum(1)
    assert len(set(per_micro.tolist())) > 1, "test needs micro-batches with unequal token counts"
    graphdef, trainable, frozen = split_trainable(model)
    grads = jax.jit(loss_and_grads, static_argnums=0, static_argnames="grad_accum_steps")
    loss1, g1 = grads(graphdef, trainable, frozen, batch, None, grad_accum_steps=1)
    loss4, g4 = grads(graphdef, trainable, frozen, batch, None, grad_accum_steps=4)
    assert float(loss4) == pytest.approx(float(loss1), rel=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g1)[0], jax.tree.leaves(g4)):
        # Micro-batches sum in another order: float32 rounding of the largest terms (~1e-7 of
        # the leaf's largest entry) can dominate an entry that cancels to near zero.
        a = np.asarray(a)
        np.testing.assert_allclose(np.asarray(b), a, rtol=1e-5, atol=1e-6 * np.abs(a).max(),
                                   err_msg=f"gradient of {sharding_lib.path_name(path)}")


def test_bfloat16_compute_keeps_float32_adapters_and_gradients():
    """bfloat16 compute and base weights: same loss as float32 to bf16 precision; the adapters and
    their gradients stay float32 (the optimizer never updates bf16 numbers)."""
    d = tiny_data()
    losses = {}
    for dtype in ("float32", "bfloat16"):
        spec = ModelSpec(family="llama", scratch=LLAMA, tokenizer="char", dtype=dtype,
                         param_dtype=dtype)
        model, tok = load_model(spec, LoraConfig(rank=4, alpha=8, target_modules=LLAMA_TARGETS))
        batch = next(iter(example_batches(d.examples("train"), tok, batch_size=8, max_length=32,
                                          shuffle=False).iterate(0, 0)))
        graphdef, trainable, frozen = split_trainable(model)
        grads_fn = jax.jit(loss_and_grads, static_argnums=0)
        loss, grads = grads_fn(graphdef, trainable, frozen, batch, None)
        losses[dtype] = float(loss)
        assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
        assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(dtype)}
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=1e-2), losses
