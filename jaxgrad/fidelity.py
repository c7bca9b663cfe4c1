"""Fidelity: GradEx estimates against real fine-tuning from θ* on the same subsets.

For K subsets of the estimates table, the LoRA adapters are really fine-tuned from θ* on the
subset's training data (``fidelity.steps`` steps, a fresh optimizer) and the target validation
metric of the result is measured. Reported per subset and summarised:

- ``true_loss``: the metric the linearized estimate predicts, on the fine-tuned θ_S: mean over
  target validation samples of ``log(1 + exp(-f_j))`` for ``logit_odds``, of the cross-entropy
  ``f_j`` itself for ``token_ce``;
- ``linearized_loss``: the estimate from the table (no forward pass);
- ``exact_loss``: the same metric of θ* + Δ_S by a forward pass (Δ_S the surrogate's update);
- mean relative error ``|est − true| / true`` and Spearman rank correlation across subsets;
- the paper's first-order error: mean over subsets and target samples of the squared relative
  error of ``f(θ*) + gᵀΔ_S`` against ``f(θ* + Δ_S)``;
- ``update_ratio``: ``‖θ_S − θ*‖ / ‖θ*‖`` of the real fine-tunes, the scale the surrogate's
  ``surrogate.scale`` stands in for.

Results go to ``<workdir>/fidelity/fidelity.json``; each subset's fine-tune is a resumable run
under ``<workdir>/fidelity/subset_<i>/``.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class FidelityConfig:
    num_subsets: int = 8  # subsets of the estimates table really fine-tuned from θ*
    steps: int = 60  # fine-tuning steps per subset
    learning_rate: float = 1e-2  # fine-tuning learning rate (constant after no warmup)


def _target_metric(output_fn: str):
    """The table's ``loss`` column as a function of per-sample outputs f (see estimate_subsets)."""
    if output_fn == "token_ce":
        return lambda f: np.mean(f)  # f is the cross-entropy itself
    return lambda f: np.mean(np.logaddexp(0.0, -f))  # logistic loss of the logit-odds


def _spearman(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3:
        return float("nan")
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def _summary(est, true) -> dict:
    est, true = np.asarray(est, float), np.asarray(true, float)
    return {"relative_error": float(np.mean(np.abs(est - true) / np.abs(true))),
            "spearman": _spearman(est, true)}


def run_fidelity(config, workdir: str) -> dict:
    """Fine-tune θ* on ``config.fidelity.num_subsets`` subsets of the table and compare."""
    from jaxgrad.data.batching import collate, encode_examples
    from jaxgrad.flat import flat_spec, flatten, tree_norm, unflatten
    from jaxgrad.losses import model_logits
    from jaxgrad.outputs import get_output_fn
    from jaxgrad.per_sample import trainable_filter
    from jaxgrad.pipeline import _load_theta_star, _projector, _read_estimates, resolved_config
    from jaxgrad.store import GradientStore
    from jaxgrad.surrogate import fit_subsets, rescale_factors
    from jaxgrad.selection import masks_from_sources
    from jaxgrad.train import TrainConfig, fit, load_data

    config = resolved_config(config, workdir)
    fcfg = FidelityConfig(**dict(config.get("fidelity") or {}))
    out_dir = os.path.join(workdir, "fidelity")
    os.makedirs(out_dir, exist_ok=True)
    data = load_data(config.data)
    rows = _read_estimates(os.path.join(workdir, "estimates", "estimates.csv"))[: int(fcfg.num_subsets)]
    if not rows:
        raise ValueError(f"{workdir}/estimates/estimates.csv has no rows: run the estimates stage first")
    out_fn = get_output_fn(str(config.gradients.output_fn), float(config.gradients.eps))
    model, tokenizer = _load_theta_star(config, workdir)
    filt = trainable_filter(model)
    graphdef, theta_star, rest = nnx.split(model, filt, ...)
    theta_star = jax.tree_util.tree_map(jnp.array, theta_star)
    theta_flat = flatten(theta_star)
    spec = flat_spec(theta_star)
    examples = data.examples("validation", [data.target])
    arch = "encoder_decoder" if getattr(model, "is_encoder_decoder", False) else "decoder"
    enc = encode_examples(examples, tokenizer, sources=data.sources)
    batch = collate(enc, list(range(len(examples))), max_length=int(config.train.max_length), arch=arch)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    @jax.jit
    def target_f(params):
        logits = model_logits(nnx.merge(graphdef, params, rest), batch)
        return out_fn(logits, batch["targets"], batch["target_mask"])

    # The surrogate's Δ_S for these subsets (refit: cheap), for exact and first-order checks.
    train = GradientStore.open(os.path.join(workdir, "gradients", "train"))
    target = GradientStore.open(os.path.join(workdir, "gradients", "target"))
    sources = list(data.sources)
    ids = np.array([sources.index(s) for s in train.source_ids])
    subsets = np.array([[s in r["sources"].split("+") for s in sources] for r in rows])
    s = config.surrogate
    feats = train.feats() if config.gradients.output_fn != "token_ce" else -train.feats()
    fits = fit_subsets(feats, masks_from_sources(ids, subsets, n_sources=len(sources)),
                       objective=s.objective, C=float(s.C), seed=int(s.seed),
                       offsets=train.f() if s.objective == "taylor" else None)
    projector = _projector(config, int(theta_flat.shape[0]))
    scale = None if float(s.scale) <= 0 else float(s.scale)
    c = rescale_factors(fits.coef, projector.gram(), float(tree_norm(theta_star)), scale=scale)
    f_star = np.asarray(target_f(theta_star))
    x_t = target.feats()

    results = []
    for i, row in enumerate(rows):
        chosen = row["sources"].split("+")
        run_dir = os.path.join(out_dir, f"subset_{int(row['subset'])}")
        nnx.update(model, theta_star)
        tc = TrainConfig.from_config(config.train, config.mesh)
        tc = TrainConfig(**{**tc.__dict__, "num_steps": int(fcfg.steps),
                            "learning_rate": float(fcfg.learning_rate), "warmup_steps": 0,
                            "max_new_tokens": 0, "progress": False, "async_checkpoint": False,
                            "eval_every": 0, "best_metric": "train_loss"})
        trained = fit(model, tokenizer, data.examples("train", chosen), tc, run_dir,
                      sources=data.sources).model
        theta_s = nnx.state(trained, filt)
        f_true = np.asarray(target_f(theta_s))
        delta = np.asarray(c[i]) * np.asarray(projector.lift(fits.coef[i]))
        params_delta = jax.tree_util.tree_map(lambda a, b: a + b, theta_star,
                                              unflatten(jnp.asarray(delta), spec))
        f_exact = np.asarray(target_f(params_delta))
        f_lin = f_star + float(c[i]) * (x_t @ np.asarray(fits.coef[i]))
        metric = _target_metric(str(config.gradients.output_fn))
        results.append({
            "subset": int(row["subset"]), "sources": row["sources"],
            "true_loss": float(metric(f_true)),
            "linearized_loss": float(row["loss"]),
            "linearized_loss_refit": float(metric(f_lin)),
            "exact_loss": float(metric(f_exact)),
            "first_order_sq_rel_error": float(np.mean(
                ((f_lin - f_exact) / np.maximum(np.maximum(np.abs(f_exact), np.abs(f_star)), 1e-8)) ** 2)),
            "update_ratio": float(np.linalg.norm(np.asarray(flatten(theta_s)) - np.asarray(theta_flat))
                                  / np.linalg.norm(np.asarray(theta_flat))),
        })
    true = [r["true_loss"] for r in results]
    out = {
        "rows": results,
        "summary": {"linearized": _summary([r["linearized_loss"] for r in results], true),
                    "exact": _summary([r["exact_loss"] for r in results], true)},
        "first_order_error": float(np.mean([r["first_order_sq_rel_error"] for r in results])),
        "update_ratio_median": float(np.median([r["update_ratio"] for r in results])),
        "settings": {"steps": int(fcfg.steps), "learning_rate": float(fcfg.learning_rate),
                     "scale": s.scale, "objective": s.objective, "C": float(s.C)},
    }
    with open(os.path.join(out_dir, "fidelity.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out
