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

One step on one batch (``fidelity.steps = 1``, every example of the subset in the batch, no
LoRA dropout) is computed without training: that step's gradient is the token-mean over the
subset, ``ΣG_u / ΣT_u`` over its units u (G_u the gradient at θ* of unit u's summed token
cross-entropy, T_u its target-token count), so each unit's sum is computed once and every subset's
update is ``make_optimizer``'s step on that gradient, as ``fit`` would take it (equal up to float
rounding: ``tests/test_fidelity.py``). The demo's 21 pairs of 7 sources then cost 7 passes over
the data instead of 21 fine-tunes.

Results go to ``<workdir>/fidelity/fidelity.json``; each subset's fine-tune is a resumable run
under ``<workdir>/fidelity/subset_<i>/`` (``fidelity/settings.json`` guards against resuming
runs made with other fine-tuning settings).
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxgrad._compat import moved_names
from jaxgrad import rundir
from jaxgrad.common.flat import flat_spec, flatten, tree_norm, unflatten
from jaxgrad.common.jsonio import read_json, write_json
from jaxgrad.common.progress import progress_bar
from jaxgrad.config import FidelityConfig, TrainConfig
from jaxgrad.data.batching import collate
from jaxgrad.data.sources import load_data
from jaxgrad.estimate.lift import rescale_factors
from jaxgrad.estimate.stage import read_estimates
from jaxgrad.estimate.subsets import masks_from_sources
from jaxgrad.estimate.surrogate import fit_subsets
from jaxgrad.estimate.target import target_metric, target_outputs
from jaxgrad.gradients.stage import projector_from_config
from jaxgrad.gradients.store import GradientStore
from jaxgrad.groups.stage import pipeline_units
from jaxgrad.models.forward import encode_for_model
from jaxgrad.models.lora import split_trainable, trainable_filter
from jaxgrad.rundir import resolved_config
from jaxgrad.train.evaluate import choice_accuracy, target_choices
from jaxgrad.train.loop import fit
from jaxgrad.train.losses import batch_loss
from jaxgrad.train.optim import make_optimizer
from jaxgrad.train.stage import load_theta_star

# One-step fine-tunes on subsets that fit one batch are computed from per-unit gradient sums
# (run_fidelity); False forces `fit` for every subset (the tests compare the two).
ONE_BATCH_SHORTCUT = True


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


def _check_settings(out_dir: str, settings: dict) -> None:
    path = os.path.join(out_dir, rundir.FIDELITY_SETTINGS_FILE)
    if os.path.isfile(path):
        old = read_json(path)
        old.setdefault("seed", 0)  # written before the seed was recorded: made with train.seed 0
        if old != settings:
            raise ValueError(f"{out_dir} holds fine-tunes made with other fidelity settings "
                             f"({old} != {settings}); delete it to rerun")
        return
    write_json(path, settings)


def _unit_gradient_sums(config, data, units, model, tokenizer, graphdef, rest, filt):
    """``(unit_examples, gradient_sums)``: ``unit_examples(unit)``, the unit's train examples
    (cached), and ``gradient_sums(unit) -> (G, T)``, the gradient at θ* of the unit's summed
    training token cross-entropy (a trainable-state tree, float32) and its target-token count.

    One full-batch step on a union of units has the token-mean gradient ``ΣG / ΣT`` over its
    units, so the fidelity stage's one-step fine-tunes need one pass over each unit's examples
    instead of one per subset (see :func:`run_fidelity`). Results are cached per unit.
    """
    max_length, chunk = int(config.train.max_length), 256

    @jax.jit
    def sums(params, batch):
        # normalizer 1: the summed (not mean) token cross-entropy of the batch's valid rows
        grads = jax.grad(lambda p: batch_loss(nnx.merge(graphdef, p, rest), batch,
                                              normalizer=1.0))(params)
        valid = batch["valid"].astype(jnp.float32)
        return grads, jnp.sum(batch["target_mask"].astype(jnp.float32) * valid[:, None])

    params = nnx.state(model, filt)
    cache: dict[str, tuple] = {}
    unit_examples = functools.cache(lambda unit: units.examples(data, "train", [unit]))

    def gradient_sums(unit: str):
        if unit not in cache:
            examples = unit_examples(unit)
            enc, arch = encode_for_model(examples, tokenizer, model, sources=data.sources)
            g_total, t_total = None, 0.0
            for start in range(0, len(examples), chunk):
                idx = list(range(start, min(start + chunk, len(examples))))
                batch = collate(enc, idx, max_length=max_length, arch=arch, batch_size=chunk,
                                buckets=(max_length,))  # one shape: one compilation of sums
                g, t = sums(params, {k: jnp.asarray(v) for k, v in batch.items()})
                g_total = g if g_total is None else jax.tree.map(jnp.add, g_total, g)
                t_total += float(t)
            cache[unit] = (g_total, t_total)
        return cache[unit]

    return unit_examples, gradient_sums


def _one_step_update(tc):
    """``update(θ*, unit_sums) -> (θ_S, grad_norm)``: θ_S after one step of ``make_optimizer(tc)``
    on the token-mean gradient of the units whose ``(G, T)`` sums are given, and that gradient's
    global norm (before clipping): what ``fit`` computes from one batch holding every example of
    the units. One jitted step (a compilation per number of units), not eager operations."""
    tx = make_optimizer(tc, 1)

    @jax.jit
    def step(theta_star, grad_sums, tokens):
        grads = jax.tree.map(lambda *g: sum(g) / jnp.maximum(sum(tokens), 1.0), *grad_sums)
        updates, _ = tx.update(grads, tx.init(theta_star), theta_star)
        return optax.apply_updates(theta_star, updates), optax.global_norm(grads)

    def update(theta_star, unit_sums):
        theta_s, norm = step(theta_star, *zip(*[(g, jnp.float32(t)) for g, t in unit_sums]))
        return theta_s, float(norm)
    return update


def _refit(config, workdir: str, data, rows):
    """The surrogate fits (config.surrogate) of the subsets named by estimates-table ``rows``."""
    train = GradientStore.open(rundir.gradients_dir(workdir, "train"))
    units = pipeline_units(config, workdir, data.sources)
    sources = units.names
    ids = units.row_ids(train.example_ids, train.source_ids)
    subsets = np.array([[s in r["source_list"] for s in sources] for r in rows])
    s = config.surrogate
    feats = train.feats() if config.gradients.output_fn != "token_ce" else -train.feats()
    return fit_subsets(feats, masks_from_sources(ids, subsets, n_sources=len(sources)),
                       objective=s.objective, C=float(s.C), seed=int(s.seed),
                       offsets=train.f() if s.objective == "taylor" else None)


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
    tc = TrainConfig.from_config(config.train, config.mesh)
    tc = TrainConfig(**{**tc.__dict__, "num_steps": int(fcfg.steps), "optimizer": fcfg.optimizer,
                        "learning_rate": float(fcfg.learning_rate), "warmup_steps": 0,
                        "schedule": "constant", "batch_size": int(fcfg.batch_size or tc.batch_size),
                        "grad_accum_steps": 1, "max_new_tokens": 0,
                        "max_grad_norm": (tc.max_grad_norm if float(fcfg.max_grad_norm) < 0
                                          else float(fcfg.max_grad_norm)), "progress": False,
                        "async_checkpoint": False, "eval_every": 0, "save_every": 0,
                        "best_metric": "train_loss", "stop_after_steps": 0})
    settings = {"steps": tc.num_steps, "learning_rate": tc.learning_rate, "optimizer": tc.optimizer,
                "batch_size": tc.batch_size, "max_grad_norm": tc.max_grad_norm, "seed": tc.seed}
    _check_settings(out_dir, settings)

    metric = target_metric(str(config.gradients.output_fn))
    model, tokenizer = load_theta_star(config, workdir)
    filt = trainable_filter(model, bool(config.train.full_finetune))
    graphdef, theta_star, rest = nnx.split(model, filt, ...)
    theta_star = jax.tree_util.tree_map(jnp.array, theta_star)
    theta_np = np.asarray(flatten(theta_star))
    theta_norm = float(tree_norm(theta_star))
    spec = flat_spec(theta_star)
    examples, target_f = target_outputs(config, data, model, tokenizer, graphdef, rest)

    def f_at(delta):
        """Per-sample outputs f at θ* + delta (a D-vector)."""
        params = jax.tree_util.tree_map(lambda a, b: a + b, theta_star,
                                        unflatten(jnp.asarray(delta), spec))
        return np.asarray(target_f(params))

    units = pipeline_units(config, workdir, data.sources)
    # The surrogate's Δ_S for these subsets (refit: cheap), for exact and first-order checks.
    target = GradientStore.open(rundir.gradients_dir(workdir, "target"))
    s = config.surrogate
    fits = _refit(config, workdir, data, rows)
    projector = projector_from_config(config, int(theta_np.size))
    gram = projector.gram()
    scale = None if float(s.scale) <= 0 else float(s.scale)
    c = np.asarray(rescale_factors(fits.coef, gram, theta_norm, scale=scale))
    coef = np.asarray(fits.coef)
    lifted_norm = np.sqrt(np.maximum(np.einsum("sk,kl,sl->s", coef, np.asarray(gram), coef), 0.0))
    coef_norm = np.linalg.norm(coef, axis=1)
    f_star = np.asarray(target_f(theta_star))
    base_loss = float(metric(f_star))
    accuracy = _choice_accuracy_fn(config, data, tokenizer)
    base_acc = accuracy(model)
    # The table's linearized estimates start from the stored f(θ*) (rounded to the store's dtype):
    # their change is measured from that, the other estimates' from a fresh forward pass.
    table_base = float(metric(np.asarray(target.f(), np.float64)))
    x_t = np.asarray(target.feats())

    # fidelity.steps = 1 with LoRA dropout off: a subset whose examples fit one batch gets the
    # exact one-step update from per-unit gradient sums (fit's result up to float rounding).
    one_batch = (ONE_BATCH_SHORTCUT and tc.num_steps == 1
                 and float(config.lora.get("dropout", 0.0)) == 0.0)
    unit_examples, gradient_sums = _unit_gradient_sums(config, data, units, model, tokenizer,
                                                       graphdef, rest, filt)
    one_step = _one_step_update(tc)
    results = []
    show = bool(config.train.get("progress", True)) and jax.process_index() == 0
    for i, row in enumerate(progress_bar(rows, desc="fidelity fine-tunes", unit="subset",
                                         disable=not show)):
        chosen = row["source_list"]
        run_dir = rundir.fidelity_subset_dir(workdir, row["subset"])
        truth_path = os.path.join(run_dir, rundir.TRUTH_FILE)
        # What the measurements depend on besides the fine-tune settings (settings.json).
        key = json.dumps({"sources": row["sources"], "theta_norm": round(theta_norm, 6),
                          "output_fn": str(config.gradients.output_fn),
                          "eps": float(config.gradients.eps),
                          "max_length": int(config.train.max_length),
                          "target_ids": [e.get("example_id") for e in examples]}, sort_keys=True)
        truth = np.load(truth_path) if os.path.isfile(truth_path) else None
        if truth is not None and str(truth["key"]) == key:
            f_true, u = truth["f_true"], truth["update"]
            acc_true, grad_norms = float(truth["accuracy"]), list(truth["grad_norms"])
        else:
            nnx.update(model, theta_star)
            train_examples = units.examples(data, "train", chosen)
            counts = [len(unit_examples(n)) for n in chosen]
            if one_batch and len(train_examples) <= tc.batch_size and sum(counts) == len(train_examples):
                # One step on one batch holding the whole subset: the same update as `fit`, from
                # the units' gradient sums (computed once per unit, not once per subset).
                theta_s, norm = one_step(theta_star, [gradient_sums(n) for n in chosen])
                grad_norms = [norm]
                nnx.update(model, theta_s)
                trained = model
            else:
                grad_norms = []
                trained = fit(model, tokenizer, train_examples, tc, run_dir, sources=data.sources,
                              callback=lambda step, m: grad_norms.append(float(m["grad_norm"]))
                              ).model
                theta_s = nnx.state(trained, filt)
            f_true = np.asarray(target_f(theta_s))
            u = np.asarray(flatten(theta_s)) - theta_np
            acc_true = accuracy(trained)
            os.makedirs(run_dir, exist_ok=True)
            if jax.process_index() == 0:
                tmp = os.path.join(run_dir, f"truth.tmp{os.getpid()}.npz")
                np.savez(tmp, key=np.str_(key), f_true=f_true, update=u.astype(np.float32),
                         accuracy=np.float64(acc_true), grad_norms=np.asarray(grad_norms))
                os.replace(tmp, truth_path)
            nnx.update(model, theta_star)
        pu = np.asarray(projector.project(jnp.asarray(u, jnp.float32)))
        delta = c[i] * np.asarray(projector.lift(coef[i]))
        f_exact = f_at(delta)
        f_lin = f_star + c[i] * (x_t @ coef[i])
        true_loss = float(metric(f_true))
        pu_norm = float(np.linalg.norm(pu))
        results.append({
            "subset": int(row["subset"]), "sources": chosen,
            "true_loss": true_loss,
            "true_accuracy": acc_true,
            "linearized_loss": float(row["loss"]),
            "linearized_loss_refit": float(metric(f_lin)),
            "exact_loss": float(metric(f_exact)),
            "first_order_true_loss": float(metric(f_star + x_t @ pu)),
            "true_change": true_loss - base_loss,
            "linearized_change": float(row["loss"]) - table_base,
            "exact_change": float(metric(f_exact)) - base_loss,
            "first_order_sq_rel_error": float(np.mean(
                ((f_lin - f_exact) / np.maximum(np.maximum(np.abs(f_exact), np.abs(f_star)), 1e-8)) ** 2)),
            "update_ratio": float(np.linalg.norm(u) / np.linalg.norm(theta_np)),
            "projected_update_ratio": pu_norm / theta_norm,
            "surrogate_projected_ratio": float(c[i] * coef_norm[i] / theta_norm),
            "direction_cosine": float(pu @ coef[i] / max(pu_norm * coef_norm[i], 1e-30)),
            "matched_scale": (float(pu_norm * lifted_norm[i] / (coef_norm[i] * theta_norm))
                              if coef_norm[i] > 0 else float("nan")),
            "grad_norm_mean": float(np.mean(grad_norms)) if grad_norms else float("nan"),
        })
    true = [r["true_loss"] for r in results]
    acc = [r["true_accuracy"] for r in results]
    # Refit estimates: the table's own when the surrogate settings are the table's (equal up to
    # the store's rounding of f(θ*)), the given settings' otherwise.
    lin = [r["linearized_loss_refit"] for r in results]
    out = {
        "rows": results,
        "theta_star_loss": base_loss,
        "theta_star_accuracy": base_acc,
        # Spearman of the estimated loss with the true accuracy, negated: + = lower estimated
        # loss goes with higher accuracy (NaN when the accuracy is not defined or constant).
        "accuracy_spearman": {"linearized": -_spearman(lin, acc),
                              "exact": -_spearman([r["exact_loss"] for r in results], acc),
                              "true_loss": -_spearman(true, acc)},
        "summary": {"linearized": _summary(lin, true, base_loss),
                    "exact": _summary([r["exact_loss"] for r in results], true, base_loss)},
        "first_order_true": _summary([r["first_order_true_loss"] for r in results], true, base_loss),
        "first_order_error": float(np.mean([r["first_order_sq_rel_error"] for r in results])),
        "update_ratio_median": float(np.median([r["update_ratio"] for r in results])),
        "projected_update_ratio_median": float(np.median([r["projected_update_ratio"] for r in results])),
        "direction_cosine_mean": float(np.mean([r["direction_cosine"] for r in results])),
        "settings": {**settings, "scale": s.scale, "objective": s.objective, "C": float(s.C),
                     "num_subsets": len(results)},
    }
    finite = [r for r in results if np.isfinite(r["matched_scale"])]
    if fcfg.calibrate and not finite:
        out["calibrated"] = None  # every surrogate coefficient was zero: nothing to calibrate
    elif fcfg.calibrate:
        cal = suggest_scale(finite)
        c_cal = np.asarray(rescale_factors(fits.coef, gram, theta_norm, scale=cal))
        lin_cal, exact_cal = [], []
        for i in range(len(results)):
            lin_cal.append(float(metric(f_star + c_cal[i] * (x_t @ coef[i]))))
            exact_cal.append(float(metric(f_at(c_cal[i] * np.asarray(projector.lift(coef[i]))))))
            results[i]["linearized_loss_calibrated"] = lin_cal[-1]
            results[i]["exact_loss_calibrated"] = exact_cal[-1]
        out["calibrated"] = {"scale": cal,
                             "linearized": _summary(lin_cal, true, base_loss),
                             "exact": _summary(exact_cal, true, base_loss)}
    if write:
        write_json(os.path.join(workdir, rundir.FIDELITY_FILE), out)
    return out


def _choice_accuracy_fn(config, data, tokenizer):
    """``model -> accuracy`` of the most likely answer on the target's validation examples
    (:func:`jaxgrad.train.evaluate.choice_accuracy`), or ``model -> nan`` when the target's
    answers are open-ended."""
    choices = target_choices(data)
    examples = data.target_examples()
    if choices is None:
        return lambda model: float("nan")
    return lambda model: choice_accuracy(model, tokenizer, examples, choices, sources=data.sources,
                                         max_length=int(config.train.max_length),
                                         batch_size=int(config.gradients.batch_size))[0]


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
    model, tokenizer = load_theta_star(config, workdir)
    graphdef, theta_star, rest = split_trainable(model, bool(config.train.full_finetune))
    theta_star = jax.tree_util.tree_map(jnp.array, theta_star)
    spec = flat_spec(theta_star)
    theta_norm = float(tree_norm(theta_star))
    dim = int(flatten(theta_star).shape[0])
    examples, f = target_outputs(config, data, model, tokenizer, graphdef, rest)

    @jax.jit
    def f_and_dir(delta_flat):
        tangent = unflatten(delta_flat, spec)
        return jax.jvp(f, (theta_star,), (tangent,))

    def directions(kind):
        if kind == "finetune":  # the real fine-tunes' updates θ_S − θ* (truth.npz of run_fidelity)
            for path in finetune_updates[:seeds]:
                yield np.load(path)["update"]
            return
        if kind == "random":
            for seed in range(seeds):
                yield np.asarray(jax.random.normal(jax.random.key(seed), (dim,), jnp.float32))
            return
        fits = _refit(config, workdir, data, rows[:seeds])
        projector = projector_from_config(config, dim)
        for coef in np.asarray(fits.coef):
            yield np.asarray(projector.lift(jnp.asarray(coef)))

    f0 = np.asarray(f(theta_star), np.float64)
    fid_dir = os.path.join(workdir, rundir.FIDELITY_DIR)
    finetune_updates = sorted(
        (os.path.join(fid_dir, d, rundir.TRUTH_FILE)
         for d in (os.listdir(fid_dir) if os.path.isdir(fid_dir) else [])
         if os.path.isfile(os.path.join(fid_dir, d, rundir.TRUTH_FILE))),
        key=lambda p: int(os.path.basename(os.path.dirname(p)).split("_")[-1]))
    results = {}
    kinds = ("random", "surrogate") + (("finetune",) if finetune_updates else ())
    for kind in kinds:
        per = {float(s): {"err": [], "base": []} for s in scales}
        for d in directions(kind):
            unit = d / max(float(np.linalg.norm(d)), 1e-30)
            _, gd_unit = f_and_dir(jnp.asarray(unit, jnp.float32))
            gd_unit = np.asarray(gd_unit, np.float64)
            for s in scales:
                step = float(s) * theta_norm
                f_pert = np.asarray(f(jax.tree_util.tree_map(
                    lambda a, b: a + b, theta_star,
                    unflatten(jnp.asarray(step * unit, jnp.float32), spec))), np.float64)
                denom = np.maximum(np.maximum(np.abs(f_pert), np.abs(f0)), 1e-12)
                per[float(s)]["err"].append(float(np.mean(((f0 + step * gd_unit - f_pert) / denom) ** 2)))
                per[float(s)]["base"].append(float(np.mean(((f0 - f_pert) / denom) ** 2)))
        results[kind] = {str(s): {"mean": float(np.mean(v["err"])),
                                  "mean_std": float(np.std(v["err"])),
                                  "baseline_mean": float(np.mean(v["base"])),
                                  "seeds": len(v["err"])} for s, v in per.items()}
    return {"theta_norm": theta_norm, "D": dim, "num_samples": len(examples),
            "output_fn": str(config.gradients.output_fn), "results": results}


__getattr__ = moved_names(__name__)  # names that moved out of this module (jaxgrad._compat)
