"""jaxgrad.fidelity on configs/demo.py:tiny: real fine-tunes from θ* against the estimates."""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
import pytest

from configs import demo
from jaxgrad.fidelity import FidelityConfig, _summary, run_fidelity, suggest_scale
from jaxgrad.pipeline import run_pipeline


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny pipeline run up to the estimates table (all that fidelity needs)."""
    workdir = str(tmp_path_factory.mktemp("fidelity"))
    run_pipeline(demo.get_config("tiny"), workdir,
                 stages=["base", "meta_train", "gradients", "estimates"])
    return workdir


def _config(**fidelity):
    config = demo.get_config("tiny")
    config.fidelity = ml_collections.ConfigDict(fidelity)
    return config


def test_summary_change_metrics():
    base = 1.0
    true = np.array([0.9, 1.2, 0.95, 1.1])
    est = np.array([0.8, 1.4, 0.9, 1.2])  # every change twice the true one, same order
    s = _summary(est, true, base)
    assert s["spearman"] == pytest.approx(1.0)
    assert s["change_pearson"] == pytest.approx(1.0)
    assert s["change_relative_error"] == pytest.approx(1.0)  # Σ|2d - d| / Σ|d|
    assert s["sign_agreement"] == 1.0
    assert s["relative_error"] == pytest.approx(np.mean(np.abs(est - true) / true))
    flipped = _summary(2 * base - est, true, base)  # opposite changes
    assert flipped["sign_agreement"] == 0.0 and flipped["spearman"] == pytest.approx(-1.0)
    assert "change_pearson" not in _summary(est, true)  # no base, level metrics only


def test_suggest_scale_and_config_checks():
    rows = [{"matched_scale": v} for v in (0.01, 0.03, float("nan"), 0.02)]
    assert suggest_scale(rows) == pytest.approx(0.02)  # median of the finite values
    with pytest.raises(ValueError, match="matched_scale"):
        suggest_scale([{"matched_scale": float("nan")}])
    with pytest.raises(ValueError, match="optimizer"):
        FidelityConfig(optimizer="lion")
    with pytest.raises(ValueError, match="steps"):
        FidelityConfig(steps=0)


def test_normalised_gradient_steps_against_estimates(run_dir):
    """One full-batch SGD step per subset with every gradient clipped to a tiny norm: each
    fine-tune moves θ* by lr·clip exactly (the same length for every subset, as the surrogate's
    Δ_S), in the direction the surrogate's coefficients point to, and in the linear regime."""
    lr, clip = 0.5, 1e-3
    out = run_fidelity(_config(num_subsets=3, steps=1, learning_rate=lr, optimizer="sgd",
                               batch_size=64, max_grad_norm=clip), run_dir)
    rows = out["rows"]
    assert len(rows) == 3
    ratios = np.array([r["update_ratio"] for r in rows])
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-3)  # same step length everywhere
    assert all(r["grad_norm_mean"] > clip for r in rows)
    for r in rows:
        # the table's estimate is reproduced by refitting the same subset
        assert r["linearized_loss_refit"] == pytest.approx(r["linearized_loss"], rel=1e-4)
        # Δ_S points the way a gradient step on S goes (in the projected space)
        assert r["direction_cosine"] > 0.3, r
        # a tiny step: f(θ*) + gᵀu (g through the k = 32 projection) predicts the clear changes
        if abs(r["true_change"]) > 1e-4:
            assert r["first_order_true_loss"] - out["theta_star_loss"] == pytest.approx(
                r["true_change"], rel=0.5)
        assert r["true_change"] == pytest.approx(r["true_loss"] - out["theta_star_loss"])
    # calibration: the linearized change is linear in the scale
    cal = out["calibrated"]["scale"]
    assert cal == pytest.approx(suggest_scale(rows)) and 0 < cal < 1
    for r in rows:
        assert (r["linearized_loss_calibrated"] - out["theta_star_loss"]) == pytest.approx(
            r["linearized_change"] * cal / demo.get_config("tiny").surrogate.scale, rel=1e-3,
            abs=1e-7)
        # and at the calibrated scale (Δ_S as long as the real step) it is closer to the truth
        assert (abs(r["linearized_loss_calibrated"] - r["true_loss"])
                < abs(r["linearized_loss"] - r["true_loss"]))
    saved = json.load(open(os.path.join(run_dir, "fidelity", "fidelity.json")))
    assert saved["settings"]["optimizer"] == "sgd" and saved["summary"].keys() == {"linearized", "exact"}
    # a rerun with other fine-tuning settings is refused instead of resuming the old runs
    with pytest.raises(ValueError, match="other fidelity settings"):
        run_fidelity(_config(num_subsets=3, steps=2, learning_rate=lr, optimizer="sgd",
                             batch_size=64, max_grad_norm=clip), run_dir)
