"""jaxgrad.pipeline.fidelity (and fidelity_truth) on configs/demo.py:tiny: real fine-tunes from θ*
against the estimates; the fidelity stage of a whole pipeline run and its part of the report."""

from __future__ import annotations

import csv
import json
import os
import shutil

import ml_collections
import numpy as np
import pytest

from configs import demo
from jaxgrad.config import FidelityConfig
from jaxgrad.pipeline import ConfigChangedError, fidelity_truth, run_pipeline
from jaxgrad.pipeline.fidelity import _summary, first_order_error, run_fidelity, suggest_scale


@pytest.fixture(scope="module")
def estimates_dir(tmp_path_factory):
    """A tiny pipeline run up to the estimates table (all that fidelity needs), this module's
    own: its tests run fidelity in it (``run_dir``, tests/conftest.py, is the whole run)."""
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


def test_normalised_gradient_steps_against_estimates(estimates_dir):
    """One full-batch SGD step per subset with every gradient clipped to a tiny norm: each
    fine-tune moves θ* by lr·clip exactly (the same length for every subset, as the surrogate's
    Δ_S), in the direction the surrogate's coefficients point to, and in the linear regime."""
    lr, clip = 0.5, 1e-3
    out = run_fidelity(_config(num_subsets=3, steps=1, learning_rate=lr, optimizer="sgd",
                               batch_size=64, max_grad_norm=clip), estimates_dir)
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
    saved = json.load(open(os.path.join(estimates_dir, "fidelity", "fidelity.json")))
    assert saved["settings"]["optimizer"] == "sgd" and saved["summary"].keys() == {"linearized", "exact"}
    # a rerun with other fine-tuning settings is refused instead of resuming the old runs
    with pytest.raises(ValueError, match="other fidelity settings"):
        run_fidelity(_config(num_subsets=3, steps=2, learning_rate=lr, optimizer="sgd",
                             batch_size=64, max_grad_norm=clip), estimates_dir)


def test_fine_tunes_measured_once_and_rescored_under_other_surrogate_settings(estimates_dir):
    """truth.npz keeps each fine-tune's update and outputs: another surrogate objective re-scores
    the same fine-tunes without training again, and write=False leaves fidelity.json alone."""
    settings = dict(num_subsets=2, steps=1, learning_rate=0.5, optimizer="sgd", batch_size=64,
                    max_grad_norm=1e-3)
    first = run_fidelity(_config(**settings), estimates_dir)
    truth = os.path.join(estimates_dir, "fidelity", f"subset_{first['rows'][0]['subset']}", "truth.npz")
    stamp = os.path.getmtime(truth)
    saved = open(os.path.join(estimates_dir, "fidelity", "fidelity.json")).read()
    config = _config(**settings)
    config.surrogate.objective = "taylor"
    other = run_fidelity(config, estimates_dir, write=False)
    assert os.path.getmtime(truth) == stamp, "the fine-tune was measured again"
    assert open(os.path.join(estimates_dir, "fidelity", "fidelity.json")).read() == saved
    assert [r["true_loss"] for r in other["rows"]] == [r["true_loss"] for r in first["rows"]]
    assert other["settings"]["objective"] == "taylor"
    assert [r["linearized_loss_refit"] for r in other["rows"]] != \
        [r["linearized_loss_refit"] for r in first["rows"]]
    # the demo's answers are open-ended (no closed answer set): accuracy is not defined
    assert np.isnan(first["theta_star_accuracy"])


def test_first_order_error_vanishes_quadratically(estimates_dir):
    """The paper's first-order test: the error of f(θ*) + gᵀΔ falls like s² relative to the
    no-gradient baseline's (so its ratio to the baseline like s²), in both kinds of direction."""
    out = first_order_error(demo.get_config("tiny"), estimates_dir, scales=(1e-3, 1e-2, 0.1), seeds=2)
    assert out["num_samples"] == 8 and out["D"] > 0 and out["theta_norm"] > 0
    measured = os.path.isdir(os.path.join(estimates_dir, "fidelity")) and any(
        os.path.isfile(os.path.join(estimates_dir, "fidelity", d, "truth.npz"))
        for d in os.listdir(os.path.join(estimates_dir, "fidelity")))
    assert set(out["results"]) == {"random", "surrogate"} | ({"finetune"} if measured else set())
    for kind in out["results"]:
        res = out["results"][kind]
        ratio = {s: res[s]["mean"] / res[s]["baseline_mean"] for s in res}
        assert all(res[s]["seeds"] == 2 and res[s]["baseline_mean"] > 0 for s in res)
        # first order beats no gradient, and by far more at small steps
        assert ratio["0.001"] < 1e-3, (kind, ratio)
        assert ratio["0.001"] < ratio["0.01"] < ratio["0.1"], (kind, ratio)
        assert res["0.001"]["baseline_mean"] < res["0.1"]["baseline_mean"]
    with pytest.raises(ValueError, match="fewer than seeds"):
        first_order_error(demo.get_config("tiny"), estimates_dir, seeds=10 ** 6)


def test_spearman_averages_ties_and_refuses_constant_or_missing_values():
    from scipy.stats import spearmanr

    from jaxgrad.pipeline.fidelity import _spearman

    a, b = [1.0, 2.0, 2.0, 3.0, 5.0], [0.5, 0.5, 0.5, 0.7, 0.9]
    assert _spearman(a, b) == pytest.approx(spearmanr(a, b)[0])
    assert np.isnan(_spearman(a, [0.5] * 5))  # constant: no ranking, not a correlation with order
    assert np.isnan(_spearman(a, [np.nan] * 5))


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_one_step_from_unit_gradient_sums_equals_fit(estimates_dir, tmp_path, monkeypatch, clip):
    """fidelity.steps = 1 on subsets that fit one batch: the update built from each unit's
    gradient sum (ΣG / ΣT, one pass per unit) is the one `fit` makes, up to float rounding, and
    no training run is written."""
    settings = dict(num_subsets=3, steps=1, learning_rate=0.5, optimizer="sgd", batch_size=64,
                    max_grad_norm=clip)

    def run(shortcut: bool, name: str):
        workdir = tmp_path / name
        shutil.copytree(estimates_dir, workdir, ignore=shutil.ignore_patterns("fidelity"))
        monkeypatch.setattr(fidelity_truth, "ONE_BATCH_SHORTCUT", shortcut)
        out = run_fidelity(_config(**settings), str(workdir))
        subsets = [workdir / "fidelity" / f"subset_{r['subset']}" for r in out["rows"]]
        return out, [np.load(d / "truth.npz")["update"] for d in subsets], subsets

    fast, fast_updates, fast_dirs = run(True, "shortcut")
    slow, slow_updates, slow_dirs = run(False, "fit")
    assert not any((d / "ckpt").exists() for d in fast_dirs), "the shortcut trained a run"
    assert all((d / "ckpt").exists() for d in slow_dirs)
    for a, b, r in zip(fast_updates, slow_updates, fast["rows"]):
        assert np.abs(b).max() > 0
        # u = θ_S − θ* in float32 carries the rounding of θ_S: up to an ulp of a parameter
        # (2^-23 at magnitude 1; the adapters' entries are below 1) on top of the update's own.
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max() + 2.0**-22,
                                   err_msg=f"subset {r['sources']}: update differs from fit's")
    for a, b in zip(fast["rows"], slow["rows"]):
        assert a["sources"] == b["sources"]
        assert a["true_loss"] == pytest.approx(b["true_loss"], rel=1e-5)
        assert a["grad_norm_mean"] == pytest.approx(b["grad_norm_mean"], rel=1e-4)


# ------------------------------------------------------------------------------------------------
# The fidelity stage of the whole tiny run (the session fixture ``run_dir``)


def test_fidelity_switched_off_is_not_checked_and_not_reported(run_dir, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(run_dir, workdir)
    config = demo.get_config("tiny")
    config.pipeline.fidelity = False
    config.fidelity.steps = 2  # would not match the recorded fine-tunes
    run_pipeline(config, workdir, stages=["fidelity", "report"])
    assert os.path.isfile(os.path.join(workdir, "fidelity", "fidelity.json"))  # nothing deleted
    report = open(os.path.join(workdir, "report.md")).read()
    assert "## Fidelity: estimates against" not in report, "stale fidelity figures shown"
    assert "`fidelity/fidelity.json` was computed under other settings" in report  # said, not hidden
    assert "`fidelity.steps`: 1 → 2" in report
    config.pipeline.fidelity = True  # switched back on: now the change counts
    with pytest.raises(ConfigChangedError, match=r"fidelity\.steps: 1 → 2"):
        run_pipeline(config, workdir, stages=["fidelity", "report"])


def test_fidelity_stage_against_real_finetuning(run_dir):
    """pipeline.fidelity (on in the demo configs): θ* really fine-tuned on subsets of the table,
    compared with the estimates; the report shows it."""
    out = json.load(open(os.path.join(run_dir, "fidelity", "fidelity.json")))
    config = demo.get_config("tiny")
    assert len(out["rows"]) == config.fidelity.num_subsets == 3
    with open(os.path.join(run_dir, "estimates", "estimates.csv")) as f:
        table = {int(r["subset"]): r for r in csv.DictReader(f)}
    for row in out["rows"]:
        assert row["sources"] == json.loads(table[row["subset"]]["sources"])
        # the table's estimate is reproduced by refitting the same subset
        assert row["linearized_loss_refit"] == pytest.approx(row["linearized_loss"], rel=1e-4)
        # f(θ*) + gᵀΔ is first-order close to a forward pass at θ* + Δ (small Δ)
        assert row["exact_loss"] == pytest.approx(row["linearized_loss"], rel=0.05)
        assert row["true_loss"] > 0 and row["update_ratio"] > 0
    assert out["first_order_error"] < 1e-2
    report = open(os.path.join(run_dir, "report.md")).read()
    assert "## Fidelity" in report and os.path.isfile(os.path.join(run_dir, "fidelity.png"))
    lin = out["summary"]["linearized"]
    assert f"| linearized | {config.surrogate.scale:.4f} | {lin['relative_error']:.3f} |" in report
