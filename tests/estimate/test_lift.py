"""Subset estimates on a real (tiny) model: linearized vs unprojected gradients, exact vs by hand."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrad.common.flat import flat_spec, flatten, tree_norm, unflatten
from jaxgrad.models.forward import model_logits
from jaxgrad.models import load_peft_adapter, load_pretrained
from jaxgrad.estimate.lift import estimate_subsets, exact_estimates, rescale_factors
from jaxgrad.estimate.surrogate import fit_subsets
from jaxgrad.gradients.outputs import logit_odds
from jaxgrad.gradients.per_sample import num_trainable, per_sample_projected_grads
from jaxgrad.gradients.projection import Projector

from helpers import fixture, fixture_batch
from test_per_sample import one_at_a_time


def setup():
    model, _ = load_pretrained(fixture("tiny-llama"))
    load_peft_adapter(model, os.path.join(fixture("tiny-llama"), "peft_adapter"))
    batch = fixture_batch("tiny-llama")
    train = {k: np.concatenate([v, v[::-1]]) for k, v in batch.items()}  # 6 "training" samples
    train["target_mask"][3:, 3:5] = 0  # make the copies differ from the originals
    proj = Projector(seed=11, dim=num_trainable(model), k=32)
    masks = np.array([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0]], bool)
    x_train = per_sample_projected_grads(model, train, proj, chunk_size=3)
    fits = fit_subsets(np.asarray(x_train.feats), masks, C=1e-2)
    graphdef, theta, rest = nnx.split(model, nnx.LoRAParam, ...)
    c = rescale_factors(fits.coef, proj, float(tree_norm(theta)), scale=0.05)
    return model, batch, proj, fits, c, graphdef, theta, rest


def test_linearized_equals_unprojected_first_order_expansion():
    model, target, proj, fits, c, *_ = setup()
    x_t = per_sample_projected_grads(model, target, proj, chunk_size=3)
    est = estimate_subsets(fits.coef, c, x_t.feats, x_t.f)
    g_JxD, f_J = one_at_a_time(model, target, "logit_odds")  # unprojected, no vmap
    dense = np.asarray(proj.dense(), np.float64)
    for s in range(3):
        delta_D = float(c[s]) * dense @ np.asarray(fits.coef[s], np.float64)
        f_hat = f_J + g_JxD @ delta_D
        loss = np.mean(np.logaddexp(0.0, -f_hat))
        assert np.isclose(float(est["loss"][s]), loss, rtol=1e-4), (s, float(est["loss"][s]), loss)
        assert float(est["accuracy"][s]) == np.mean(f_hat > 0)


def test_exact_mode_equals_writing_theta_plus_delta_by_hand():
    model, target, proj, fits, c, graphdef, theta, rest = setup()
    batch = {k: jnp.asarray(v) for k, v in target.items()}

    def target_loss(params):
        logits = model_logits(nnx.merge(graphdef, params, rest), batch)
        return jnp.mean(jax.nn.softplus(-logit_odds(logits, batch["targets"], batch["target_mask"])))

    exact = np.asarray(exact_estimates(target_loss, theta, fits.coef, c, proj, chunk_size=2))
    spec = flat_spec(theta)
    theta_flat = np.asarray(flatten(theta))
    for s in range(3):
        delta = float(c[s]) * np.asarray(proj.lift(fits.coef[s]))
        by_hand, _ = load_pretrained(fixture("tiny-llama"))
        load_peft_adapter(by_hand, os.path.join(fixture("tiny-llama"), "peft_adapter"))
        nnx.update(by_hand, unflatten(jnp.asarray(theta_flat + delta), spec))
        logits = by_hand(batch["input_ids"], batch["attention_mask"])
        loss = float(jnp.mean(jax.nn.softplus(-logit_odds(logits, batch["targets"], batch["target_mask"]))))
        assert np.isclose(exact[s], loss, rtol=1e-5), (s, exact[s], loss)
    assert np.ptp(exact) > 0, "different subsets should give different exact estimates"
