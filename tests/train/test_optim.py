"""jaxgrad.train.optim (make_optimizer): the SGD update by hand, with clipping and weight decay."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxgrad.config import TrainConfig
from jaxgrad.train import make_optimizer


def test_sgd_optimizer_is_plain_gradient_descent():
    """optimizer="sgd": the update is -lr·g (no momentum, no normalisation), clipped by the global
    norm first, plus -lr·weight_decay·p on matrices only; unknown optimizers are refused."""
    params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([1.0, 2.0])}
    grads = {"w": jnp.array([[0.3, 0.0], [-0.4, 0.0]]), "b": jnp.array([0.0, 1.2])}  # norm 1.3
    cfg = TrainConfig(optimizer="sgd", learning_rate=0.5, schedule="constant", num_steps=1,
                      max_grad_norm=0.0)
    tx = make_optimizer(cfg, 1)
    updates, _ = tx.update(grads, tx.init(params), params)
    for name in params:
        np.testing.assert_allclose(updates[name], -0.5 * grads[name], rtol=1e-6)
    tx = make_optimizer(dataclasses.replace(cfg, max_grad_norm=0.65), 1)  # halves the gradient
    updates, _ = tx.update(grads, tx.init(params), params)
    for name in params:
        np.testing.assert_allclose(updates[name], -0.25 * grads[name], rtol=1e-5, atol=1e-7)
    tx = make_optimizer(dataclasses.replace(cfg, weight_decay=0.1), 1)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.5 * (grads["w"] + 0.1 * params["w"]), rtol=1e-6)
    np.testing.assert_allclose(updates["b"], -0.5 * grads["b"], rtol=1e-6)  # no decay on vectors
    adam = make_optimizer(dataclasses.replace(cfg, optimizer="adamw"), 1)
    updates, _ = adam.update(grads, adam.init(params), params)  # Adam's first step: ~ -lr·sign(g)
    np.testing.assert_allclose(updates["b"], [0.0, -0.5], atol=1e-5)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lion")
