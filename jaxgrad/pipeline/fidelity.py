"""Fidelity: GradEx estimates against real fine-tuning from θ* on the same subsets.

For K subsets of the estimates table, the LoRA adapters are really fine-tuned from θ* on the
subset's training data (``fidelity.steps`` steps of ``fidelity.optimizer`` at a constant
``fidelity.learning_rate``, a fresh optimizer) and the target validation metric of the result is
measured. Reported per subset and summarised:

- ``true_loss``: the metric the linearized estimate predicts, on the fine-tuned θ_S: mean over
  target validation samples of ``log(1 + exp(-f_j))`` for ``logit_odds``, of the cross-entropy
  ``f_j`` itself for ``token_ce``;
- ``linearized_loss``: the estimate from the table (no forward pass);
- ``exact_loss``: the same metric of θ* + Δ_S by a forward pass (Δ_S the surrogate's update);
- per estimate (``summary``): mean relative error ``|est − true| / true`` of the loss level,
  Spearman rank correlation across subsets, and the same for the CHANGE from θ*
  (``est − loss(θ*)`` against ``true − loss(θ*)``): ``change_relative_error`` =
  ``Σ|Δest − Δtrue| / Σ|Δtrue|``, ``change_pearson``, ``sign_agreement`` (helps / hurts agree).
  The level's relative error is nearly trivial when updates are small (every estimate is close
  to loss(θ*)); the change is what ranks subsets. Spearman is the same for levels and changes;
- the paper's first-order error: mean over subsets and target samples of the squared relative
  error of ``f(θ*) + gᵀΔ_S`` against ``f(θ* + Δ_S)``;
- ``update_ratio``: ``‖θ_S − θ*‖ / ‖θ*‖`` of the real fine-tunes; ``projected_update_ratio``:
  ``‖Pᵀ(θ_S − θ*)‖ / ‖θ*‖``; ``surrogate_projected_ratio``: ``c_S‖w_S‖ / ‖θ*‖``;
  ``direction_cosine``: cosine of ``Pᵀ(θ_S − θ*)`` and ``w_S`` in the projected space;
  ``first_order_true_loss``: the metric of ``f(θ*) + gᵀ(θ_S − θ*)`` (through the stored projected
  target gradients), i.e. how linear the real fine-tune itself is.

Scale calibration (``suggest_scale``). The linearized estimate only sees Δ_S through ``Pᵀg_j``:
``g_jᵀΔ_S = ⟨Pᵀg_j, c_S w_S⟩`` (⟨g, P w⟩ = ⟨Pᵀg, w⟩). A real update u has first-order effect ``gᵀu ≈ ⟨Pᵀg, Pᵀu⟩`` (Johnson–Lindenstrauss). So the
estimates describe updates of size ``‖Pᵀu‖ ≈ ‖u‖ = c_S‖w_S‖``, while ``surrogate.scale`` sets
``c_S‖P w_S‖``, and ``‖P w‖ ≈ √(D/k)·‖w‖`` for a k-vector lifted to D parameters. The
``matched_scale`` of a subset is the scale at which ``c_S‖w_S‖ = ‖Pᵀu_S‖``;
``suggest_scale`` returns their median. With ``fidelity.calibrate`` the estimates are recomputed
at that scale (``calibrated``); nothing else uses it.

Results go to ``<workdir>/fidelity/fidelity.json``. The fine-tunes, each a resumable run under
``<workdir>/fidelity/subset_<i>/`` measured once, are :mod:`jaxgrad.pipeline.fidelity_truth`'s;
the estimates are refit by the estimates stage's own scorer
(:class:`~jaxgrad.estimate.scorer.SurrogateScorer`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import rundir
from jaxgrad.common.distributed import barrier
from jaxgrad.common.flat import unflatten
from jaxgrad.common.jsonio import read_json, write_json
from jaxgrad.common.progress import progress_bar
from jaxgrad.config import FidelityConfig
from jaxgrad.data.sources import load_data
from jaxgrad.estimate.lift import rescale_factors
from jaxgrad.estimate.scorer import SurrogateScorer
from jaxgrad.estimate.solver import SubsetFits
from jaxgrad.estimate.stage import read_estimates, subset_rows
from jaxgrad.estimate.target import target_metric
from jaxgrad.groups.stage import pipeline_units
from jaxgrad.pipeline.fidelity_truth import (SubsetFineTunes, ThetaStar, check_settings,
                                             choice_accuracy_fn, load_theta_star_outputs,
                                             train_config)
from jaxgrad.rundir import resolved_config


def _spearman(a, b) -> float:
    """Spearman's rank correlation with average ranks for ties (scipy.stats.spearmanr's
    definition); NaN for fewer than 3 pairs, a non-finite value or a constant side."""
    from scipy.stats import rankdata

    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(rankdata(a), rankdata(b))[0, 1])


def _pearson(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _summary(est, true, base: float | None = None) -> dict:
    """Level (relative error, Spearman) and, given loss(θ*) ``base``, change metrics."""
    est, true = np.asarray(est, float), np.asarray(true, float)
    out = {"relative_error": float(np.mean(np.abs(est - true) / np.abs(true))),
           "spearman": _spearman(est, true)}
    if base is not None:
        d_est, d_true = est - base, true - base
        out["change_relative_error"] = float(np.sum(np.abs(d_est - d_true))
                                             / max(np.sum(np.abs(d_true)), 1e-12))
        out["change_pearson"] = _pearson(d_est, d_true)
        out["sign_agreement"] = float(np.mean(np.sign(d_est) == np.sign(d_true)))
    return out


def suggest_scale(rows) -> float:
    """The ``surrogate.scale`` at which the surrogate's updates have the real fine-tunes' size.

    Median over the rows of ``matched_scale`` (see the module docstring): the scale at which
    ``c_S‖w_S‖``, the size of the update the linearized estimate sees, equals ``‖Pᵀ(θ_S − θ*)‖``.
    ``rows``: ``run_fidelity(...)["rows"]``.
    """
    values = [float(r["matched_scale"]) for r in rows if np.isfinite(r.get("matched_scale", np.nan))]
    if not values:
        raise ValueError("suggest_scale: no row has a finite matched_scale")
    return float(np.median(values))


@dataclasses.dataclass
class _Estimates:
    """The estimates side of the comparison: the surrogate's Δ_S for the table's subsets, refit
    by the estimates stage's scorer (cheap), and the target metric at θ*."""

    scorer: SurrogateScorer
    fits: SubsetFits
    coef: np.ndarray  # w_S, S×k
    c: np.ndarray  # c_S at surrogate.scale
    lifted_norm: np.ndarray  # ‖P w_S‖
    coef_norm: np.ndarray  # ‖w_S‖
    x_t: np.ndarray  # the target store's projected gradients Pᵀg_j
    metric: Callable  # the table's loss column of per-sample outputs
    f_star: np.ndarray  # f(θ*) by a forward pass
    base_loss: float  # the metric of f_star
    # The table's linearized estimates start from the stored f(θ*) (rounded to the store's
    # dtype): their change is measured from that, the other estimates' from a fresh forward pass.
    table_base: float

    def lifted(self, i: int, c) -> np.ndarray:
        """Δ_S = c·P w_S of subset ``i`` (a D-vector)."""
        return c * np.asarray(self.scorer.projector.lift(self.coef[i]))

    def f_lin(self, i: int, c) -> np.ndarray:
        """The linearized outputs f(θ*) + c·⟨Pᵀg_j, w_S⟩ of subset ``i``."""
        return self.f_star + c * (self.x_t @ self.coef[i])


def _estimates(config, rows, theta: ThetaStar, scorer: SurrogateScorer) -> _Estimates:
    """The table ``rows``' subsets refit by ``scorer``, rescaled at θ* as the table's were."""
    fits = scorer.fit(subset_rows(rows, scorer.sources))
    coef = np.asarray(fits.coef)
    gram = np.asarray(scorer.gram)
    metric = target_metric(str(config.gradients.output_fn))
    f_star = np.asarray(theta.f(theta.theta))
    return _Estimates(
        scorer, fits, coef,
        c=np.asarray(rescale_factors(fits.coef, scorer.gram, theta.norm, scale=scorer.scale)),
        lifted_norm=np.sqrt(np.maximum(np.einsum("sk,kl,sl->s", coef, gram, coef), 0.0)),
        coef_norm=np.linalg.norm(coef, axis=1), x_t=np.asarray(scorer.t_feats), metric=metric,
        f_star=f_star, base_loss=float(metric(f_star)),
        table_base=float(metric(np.asarray(scorer.t_f, np.float64))))


def _compare(i: int, row: dict, truth: tuple, theta: ThetaStar, est: _Estimates) -> dict:
    """One row of ``fidelity.json``: subset ``i``'s real fine-tune against its estimates."""
    f_true, u, acc_true, grad_norms = truth
    metric, f_star, c, coef_norm = est.metric, est.f_star, est.c[i], est.coef_norm[i]
    pu = np.asarray(est.scorer.projector.project(jnp.asarray(u, jnp.float32)))
    f_exact = theta.f_at(est.lifted(i, c))
    f_lin = est.f_lin(i, c)
    true_loss = float(metric(f_true))
    pu_norm = float(np.linalg.norm(pu))
    return {
        "subset": int(row["subset"]), "sources": row["source_list"],
        "true_loss": true_loss,
        "true_accuracy": acc_true,
        "linearized_loss": float(row["loss"]),
        "linearized_loss_refit": float(metric(f_lin)),
        "exact_loss": float(metric(f_exact)),
        "first_order_true_loss": float(metric(f_star + est.x_t @ pu)),
        "true_change": true_loss - est.base_loss,
        "linearized_change": float(row["loss"]) - est.table_base,
        "exact_change": float(metric(f_exact)) - est.base_loss,
        "first_order_sq_rel_error": float(np.mean(
            ((f_lin - f_exact) / np.maximum(np.maximum(np.abs(f_exact), np.abs(f_star)), 1e-8)) ** 2)),
        "update_ratio": float(np.linalg.norm(u) / np.linalg.norm(theta.flat)),
        "projected_update_ratio": pu_norm / theta.norm,
        "surrogate_projected_ratio": float(c * coef_norm / theta.norm),
        "direction_cosine": float(pu @ est.coef[i] / max(pu_norm * coef_norm, 1e-30)),
        "matched_scale": (float(pu_norm * est.lifted_norm[i] / (coef_norm * theta.norm))
                          if coef_norm > 0 else float("nan")),
        "grad_norm_mean": float(np.mean(grad_norms)) if grad_norms else float("nan"),
    }


def _summarise(results: list[dict], est: _Estimates, base_acc: float, settings: dict) -> dict:
    """``fidelity.json`` but for ``calibrated``: the rows and their summaries."""
    true = [r["true_loss"] for r in results]
    acc = [r["true_accuracy"] for r in results]
    # Refit estimates: the table's own when the surrogate settings are the table's (equal up to
    # the store's rounding of f(θ*)), the given settings' otherwise.
    lin = [r["linearized_loss_refit"] for r in results]
    exact = [r["exact_loss"] for r in results]
    base_loss = est.base_loss
    return {
        "rows": results,
        "theta_star_loss": base_loss,
        "theta_star_accuracy": base_acc,
        # Spearman of the estimated loss with the true accuracy, negated: + = lower estimated
        # loss goes with higher accuracy (NaN when the accuracy is not defined or constant).
        "accuracy_spearman": {"linearized": -_spearman(lin, acc),
                              "exact": -_spearman(exact, acc),
                              "true_loss": -_spearman(true, acc)},
        "summary": {"linearized": _summary(lin, true, base_loss),
                    "exact": _summary(exact, true, base_loss)},
        "first_order_true": _summary([r["first_order_true_loss"] for r in results], true, base_loss),
        "first_order_error": float(np.mean([r["first_order_sq_rel_error"] for r in results])),
        "update_ratio_median": float(np.median([r["update_ratio"] for r in results])),
        "projected_update_ratio_median": float(np.median([r["projected_update_ratio"] for r in results])),
        "direction_cosine_mean": float(np.mean([r["direction_cosine"] for r in results])),
        "settings": settings,
    }


def _calibrate(results: list[dict], theta: ThetaStar, est: _Estimates) -> dict | None:
    """The estimates again at :func:`suggest_scale`'s scale (added to each row too); None when
    every surrogate coefficient was zero (nothing to calibrate)."""
    finite = [r for r in results if np.isfinite(r["matched_scale"])]
    if not finite:
        return None
    cal = suggest_scale(finite)
    c_cal = np.asarray(rescale_factors(est.fits.coef, est.scorer.gram, theta.norm, scale=cal))
    lin_cal, exact_cal = [], []
    for i in range(len(results)):
        lin_cal.append(float(est.metric(est.f_lin(i, c_cal[i]))))
        exact_cal.append(float(est.metric(theta.f_at(est.lifted(i, c_cal[i])))))
        results[i]["linearized_loss_calibrated"] = lin_cal[-1]
        results[i]["exact_loss_calibrated"] = exact_cal[-1]
    true = [r["true_loss"] for r in results]
    return {"scale": cal,
            "linearized": _summary(lin_cal, true, est.base_loss),
            "exact": _summary(exact_cal, true, est.base_loss)}


def run_fidelity(config, workdir: str, *, write: bool = True) -> dict:
    """Fine-tune θ* on ``config.fidelity.num_subsets`` subsets of the table and compare.

    Each subset's fine-tune and its measurements (``subset_<i>/truth.npz``: the update θ_S − θ*,
    the per-sample outputs and the answer-choice accuracy at θ_S) are computed once; a second
    call with other ``surrogate`` settings (objective, C, scale) re-scores the same fine-tunes in
    seconds. ``write=False`` leaves ``fidelity/fidelity.json`` as it is (to compare settings).
    """
    config = resolved_config(config, workdir)
    fcfg = FidelityConfig(**dict(config.get("fidelity") or {}))
    out_dir = os.path.join(workdir, rundir.FIDELITY_DIR)
    os.makedirs(out_dir, exist_ok=True)
    data = load_data(config.data)
    rows = read_estimates(os.path.join(workdir, rundir.ESTIMATES_FILE))[: int(fcfg.num_subsets)]
    if not rows:
        raise ValueError(f"{workdir}/estimates/estimates.csv has no rows: run the estimates stage first")
    tc, settings = train_config(config, fcfg)
    check_settings(out_dir, settings)
    theta = load_theta_star_outputs(config, workdir, data)
    scorer = theta.surrogate_scorer(config, workdir, data)
    est = _estimates(config, rows, theta, scorer)
    accuracy = choice_accuracy_fn(config, data, theta.tokenizer)
    base_acc = accuracy(theta.model)
    units = pipeline_units(config, workdir, data.sources)
    tunes = SubsetFineTunes(config, workdir, data, units, theta, tc, accuracy)
    show = bool(config.train.get("progress", True)) and jax.process_index() == 0
    with progress_bar(rows, desc="fidelity fine-tunes", unit="subset", disable=not show) as bar:
        results = [_compare(i, row, tunes.measure(row), theta, est) for i, row in enumerate(bar)]
    s = config.surrogate
    out = _summarise(results, est, base_acc, {**settings, "scale": s.scale,
                                              "objective": s.objective, "C": float(s.C),
                                              "num_subsets": len(results)})
    if fcfg.calibrate:
        out["calibrated"] = _calibrate(results, theta, est)
    if write:
        write_json(os.path.join(workdir, rundir.FIDELITY_FILE), out)
    return out


FIRST_ORDER_SCALES = (0.02, 0.05, 0.1)


def first_order_error(config, workdir: str, *, scales=FIRST_ORDER_SCALES, seeds: int = 5) -> dict:
    """The paper's first-order test at θ* of a run: how well ``f(θ*) + gᵀΔ`` predicts ``f(θ* + Δ)``.

    For each scale s and seed, a perturbation Δ of the LoRA parameters with ‖Δ‖ = s·‖θ*_LoRA‖,
    in two kinds of direction: ``random`` (isotropic Gaussian) and ``surrogate`` (the lifted
    surrogate solution ``P w_S`` of subset ``seed`` of the estimates table, the direction the
    estimates move θ* in); and, when :func:`run_fidelity` has measured real fine-tunes in the run
    directory, ``finetune`` (the directions θ_S − θ* of the first ``seeds`` of them: where real
    training goes). On every target validation sample j, with f_j the run's output
    function (``gradients.output_fn``) and ``gᵀΔ`` the exact directional derivative (``jax.jvp``,
    no projection):

      error_j = ((f_j(θ*) + g_jᵀΔ − f_j(θ*+Δ)) / max(|f_j(θ*+Δ)|, |f_j(θ*)|))²

    and the no-gradient baseline with ``f_j(θ*)`` alone as the prediction. Means over samples and
    seeds are reported per direction kind and scale (``mean``, ``baseline_mean``), with the seeds'
    spread (``mean_std``). Source: Li et al., EMNLP 2024, Sec. 3 (first-order approximation
    error, perturbations of 2–10% of ‖θ*‖ over 5 seeds).

    Returns ``{"theta_norm", "D", "num_samples", "results": {kind: {str(s): {...}}}}``.
    Raises ValueError: ``seeds`` exceeds the estimates table's rows (surrogate directions).
    """
    config = resolved_config(config, workdir)
    data = load_data(config.data)
    rows = read_estimates(os.path.join(workdir, rundir.ESTIMATES_FILE))
    if len(rows) < seeds:
        raise ValueError(f"first_order_error: {workdir}/estimates/estimates.csv has {len(rows)} "
                         f"rows, fewer than seeds={seeds}")
    theta = load_theta_star_outputs(config, workdir, data)
    f_and_dir = jax.jit(lambda delta_flat: jax.jvp(theta.f, (theta.theta,),
                                                   (unflatten(delta_flat, theta.spec),)))
    f0 = np.asarray(theta.f(theta.theta), np.float64)
    updates = _finetune_updates(workdir)

    def surrogate():
        scorer = theta.surrogate_scorer(config, workdir, data)
        fits = scorer.fit(subset_rows(rows[:seeds], scorer.sources))
        for coef in np.asarray(fits.coef):
            yield np.asarray(scorer.projector.lift(jnp.asarray(coef)))

    directions = {"random": _random_directions(seeds, theta.flat.shape[0]), "surrogate": surrogate(),
                  "finetune": (np.load(path)["update"] for path in updates[:seeds])}
    kinds = ("random", "surrogate") + (("finetune",) if updates else ())
    results = {kind: _errors(directions[kind], scales, theta, f0, f_and_dir) for kind in kinds}
    return {"theta_norm": theta.norm, "D": int(theta.flat.shape[0]),
            "num_samples": len(theta.examples), "output_fn": str(config.gradients.output_fn),
            "results": results}


def _finetune_updates(workdir: str) -> list[str]:
    """The ``truth.npz`` files of the fidelity fine-tunes in ``workdir``, by subset number."""
    fid_dir = os.path.join(workdir, rundir.FIDELITY_DIR)
    return sorted(
        (os.path.join(fid_dir, d, rundir.TRUTH_FILE)
         for d in (os.listdir(fid_dir) if os.path.isdir(fid_dir) else [])
         if os.path.isfile(os.path.join(fid_dir, d, rundir.TRUTH_FILE))),
        key=lambda p: int(os.path.basename(os.path.dirname(p)).split("_")[-1]))


def _random_directions(seeds: int, dim: int):
    for seed in range(seeds):
        yield np.asarray(jax.random.normal(jax.random.key(seed), (dim,), jnp.float32))


def _errors(directions, scales, theta: ThetaStar, f0: np.ndarray, f_and_dir) -> dict:
    """``{str(scale): {"mean", "mean_std", "baseline_mean", "seeds"}}`` over ``directions``:
    the squared relative errors of ``f(θ*) + gᵀΔ`` and of ``f(θ*)`` against ``f(θ* + Δ)`` for
    Δ along each direction with ‖Δ‖ = scale·‖θ*‖."""
    per = {float(s): {"err": [], "base": []} for s in scales}
    for d in directions:
        unit = d / max(float(np.linalg.norm(d)), 1e-30)
        _, gd_unit = f_and_dir(jnp.asarray(unit, jnp.float32))
        gd_unit = np.asarray(gd_unit, np.float64)
        for s in scales:
            step = float(s) * theta.norm
            f_pert = np.asarray(theta.f_at(jnp.asarray(step * unit, jnp.float32)), np.float64)
            denom = np.maximum(np.maximum(np.abs(f_pert), np.abs(f0)), 1e-12)
            per[float(s)]["err"].append(float(np.mean(((f0 + step * gd_unit - f_pert) / denom) ** 2)))
            per[float(s)]["base"].append(float(np.mean(((f0 - f_pert) / denom) ** 2)))
    return {str(s): {"mean": float(np.mean(v["err"])), "mean_std": float(np.std(v["err"])),
                     "baseline_mean": float(np.mean(v["base"])), "seeds": len(v["err"])}
            for s, v in per.items()}


def fidelity_enabled(config) -> bool:
    """Whether the optional fidelity stage runs (``pipeline.fidelity``).

    Args:
      config: the run config (a missing ``pipeline`` section means off).

    Returns:
      ``bool(config.pipeline.fidelity)``, False by default.
    """
    return bool((config.get("pipeline") or {}).get("fidelity", False))


def stage_fidelity(config, workdir: str) -> dict | None:
    """Optional (``pipeline.fidelity = True``): fine-tune θ* for real on ``fidelity.num_subsets``
    subsets of the estimates table and compare with the estimates (:func:`run_fidelity`).

    Args:
      config: the run config; workdir: the run directory (its estimates stage done).

    Returns:
      None when the stage is off; else the ``fidelity.json`` summary (read back when it exists,
      so nothing is recomputed), without the per-subset ``rows`` when just computed.

    Raises:
      ValueError: an empty estimates table, or as :func:`run_fidelity` raises.
    """
    if not fidelity_enabled(config):
        return None
    out = os.path.join(workdir, rundir.FIDELITY_FILE)
    if os.path.isfile(out):
        return read_json(out)
    result = run_fidelity(config, workdir)
    barrier("fidelity")  # process 0 wrote fidelity.json; the report reads it
    return {k: v for k, v in result.items() if k != "rows"}
