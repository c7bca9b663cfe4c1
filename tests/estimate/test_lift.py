"""jaxgrad.estimate.lift: the surrogate's coefficients lifted to parameter updates and the subset
estimates, linearized and exact.

On a real (tiny) model: linearized estimates against unprojected gradients taken one example at
a time, exact estimates against θ + Δ written by hand. Without a model: rescale and lift against
a dense projection matrix, the estimates against hand loops."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import fixture, fixture_batch
from helpers.gradients import one_at_a_time
from jaxgrad.common import flat
from jaxgrad.common.flat import flat_spec, flatten, tree_norm, unflatten
from jaxgrad.estimate.lift import (HIGHER_IS_BETTER, estimate_subsets, exact_estimates,
                                   lift_updates, rescale_factors)
from jaxgrad.estimate.solver import SubsetFits
from jaxgrad.estimate.surrogate import fit_subsets
from jaxgrad.gradients.outputs import logit_odds
from jaxgrad.gradients.per_sample import num_trainable, per_sample_projected_grads
from jaxgrad.gradients.projection import Projector
from jaxgrad.models import load_peft_adapter, load_pretrained
from jaxgrad.models.forward import model_logits


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


# ----------------------------------------------------------------------------------------------
# Lift, rescale and the estimates against hand computations (no model)
# ----------------------------------------------------------------------------------------------

K, D = 12, 300


def test_rescale_and_lift_against_dense_projection():
    proj = Projector(seed=3, dim=D, k=K)
    p_DxK = np.asarray(proj.dense(), np.float64)
    coef = np.random.default_rng(0).normal(size=(5, K)).astype(np.float32)
    coef[2] = 0.0
    c = rescale_factors(coef, proj, theta_norm=4.0, scale=0.25)
    delta = np.asarray(lift_updates(coef, c, proj), np.float64)
    norms = np.linalg.norm(delta, axis=1)
    np.testing.assert_allclose(norms[[0, 1, 3, 4]], 0.25 * 4.0, rtol=1e-5,
                               err_msg="‖Δ‖ must equal scale·‖θ*‖")
    assert float(c[2]) == 0.0 and norms[2] == 0.0, "w = 0 must give c = 0 and Δ = 0"
    np.testing.assert_allclose(delta, np.asarray(c, np.float64)[:, None] * (coef @ p_DxK.T),
                               rtol=1e-5, atol=1e-6, err_msg="Δ is not c·P w")
    # A precomputed Gram matrix gives the same factors; scale=None means unscaled.
    np.testing.assert_allclose(np.asarray(rescale_factors(coef, proj.gram(), 4.0, scale=0.25)),
                               np.asarray(c), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(rescale_factors(coef, proj, None, scale=None)), 1.0)
    with pytest.raises(ValueError, match="theta_norm must be finite and > 0"):
        rescale_factors(coef, proj, 0.0, scale=0.1)
    with pytest.raises(ValueError, match="k = 12 columns but the projector has k = 7"):
        lift_updates(coef, c, Projector(seed=3, dim=D, k=7))


def test_linearized_estimates_equal_hand_computation_and_unprojected_identity():
    rng = np.random.default_rng(1)
    proj = Projector(seed=5, dim=D, k=K)
    g_JxD = rng.normal(size=(9, D)).astype(np.float32)
    x_JxK = np.asarray(proj.project(g_JxD))
    f_J = rng.normal(size=9).astype(np.float32)
    coef = rng.normal(size=(4, K)).astype(np.float32)
    fits = SubsetFits(jnp.asarray(coef), jnp.zeros(4), jnp.ones(4, bool), jnp.zeros(4, jnp.int32),
                      jnp.zeros(4))
    c = rescale_factors(coef, proj, theta_norm=3.0, scale=0.1)
    est = estimate_subsets(fits, c, x_JxK, f_J)
    f_hat = f_J[None, :] + np.asarray(c, np.float64)[:, None] * (coef.astype(np.float64) @ x_JxK.T)
    np.testing.assert_allclose(np.asarray(est["loss"]), np.logaddexp(0, -f_hat).mean(1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(est["accuracy"]), (f_hat > 0).mean(1))
    np.testing.assert_allclose(np.asarray(est["mean_output"]), f_hat.mean(1), rtol=1e-5, atol=1e-6)
    # ⟨Pᵀg, w⟩ = ⟨g, P w⟩: the same estimate from the unprojected gradients and Δ = c·P w.
    delta_SxD = np.asarray(lift_updates(coef, c, proj), np.float64)
    f_hat_full = f_J[None, :] + delta_SxD @ g_JxD.astype(np.float64).T
    np.testing.assert_allclose(np.asarray(est["mean_output"]), f_hat_full.mean(1), rtol=1e-4,
                               atol=1e-5)
    ce = estimate_subsets(coef, c, x_JxK, np.abs(f_J), output="token_ce", chunk_size=3)
    np.testing.assert_allclose(np.asarray(ce["loss"]),
                               (np.abs(f_J)[None, :] + f_hat - f_J[None, :]).mean(1), rtol=1e-5)
    assert set(ce) == {"loss"} and set(est) <= set(HIGHER_IS_BETTER)
    with pytest.raises(ValueError, match="k = 5 columns but the coefficients have k = 12"):
        estimate_subsets(coef, c, x_JxK[:, :5], f_J)
    with pytest.raises(ValueError, match=r"target_f_J must have shape \(9,\)"):
        estimate_subsets(coef, c, x_JxK, f_J[:4])
    with pytest.raises(ValueError, match="output must be one of"):
        estimate_subsets(coef, c, x_JxK, f_J, output="bleu")


def test_exact_estimates_equal_a_hand_loop():
    rng = np.random.default_rng(2)
    theta = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
             "b": {"c": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}}
    dim = flat.flat_spec(theta).size
    proj = Projector(seed=11, dim=dim, k=K)
    inputs = jnp.asarray(rng.normal(size=(7, 4)), jnp.float32)

    def loss_fn(params):
        hidden = jnp.tanh(inputs @ params["a"].T)
        return jnp.mean(jax.nn.softplus(-hidden.sum(1) * params["b"]["c"].sum()))

    coef = rng.normal(size=(5, K)).astype(np.float32)
    c = rescale_factors(coef, proj, float(flat.tree_norm(theta)), scale=0.2)
    got = np.asarray(exact_estimates(loss_fn, theta, coef, c, proj, chunk_size=2))
    p_DxK = np.asarray(proj.dense())
    theta_flat = np.asarray(flat.flatten(theta))
    want = []
    for s in range(5):
        params = flat.unflatten(jnp.asarray(theta_flat + float(c[s]) * p_DxK @ coef[s]),
                                flat.flat_spec(theta))
        want.append(float(loss_fn(params)))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    with pytest.raises(ValueError, match="D = 17 parameters but the projector has dim = 300"):
        exact_estimates(loss_fn, theta, coef, c, Projector(seed=1, dim=D, k=K))
