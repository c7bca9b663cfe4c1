"""Step 5 as a pipeline stage: random-ensemble scores of the units from the estimates table, with
bootstrap intervals; the chosen units (top-k, threshold, or a stepwise search on the surrogate);
and the baselines they are compared with (all, random, gradient and representation similarity),
in ``<workdir>/selection/selection.json``."""

from __future__ import annotations

import os
import time
from typing import Sequence

import numpy as np

from jaxgrad import rundir
from jaxgrad.common.checks import section_dict
from jaxgrad.common.jsonio import read_json, write_shared_json
from jaxgrad.config import SELECTION_METRICS
from jaxgrad.data.sources import load_data
from jaxgrad.estimate.scorer import SurrogateScorer
from jaxgrad.estimate.stage import read_estimates
from jaxgrad.estimate.subsets import subset_size
from jaxgrad.gradients.store import GradientStore
from jaxgrad.groups.stage import pipeline_units
from jaxgrad.groups.units import Units
from jaxgrad.select.baselines import (baseline_all, baseline_random, baseline_random_total,
                                      gradient_similarity_scores)
from jaxgrad.select.representations import mean_representations
from jaxgrad.select.scores import ensemble_scores, select_threshold, select_top
from jaxgrad.select.stepwise import forward_selection, ordered_selection
from jaxgrad.train.stage import load_theta_star

BAD_KINDS = ("noisy", "unrelated")


def selection_metric(config) -> str:
    """The estimates column that scores sources: ``selection.metric``, where ``"loss"`` means the
    forward-pass ``exact_loss`` when ``surrogate.mode = "exact"`` (that is what exact mode is for).
    """
    metric = str(section_dict(config, "selection")["metric"])
    if metric not in SELECTION_METRICS:
        raise ValueError(f"config.selection.metric must be one of {SELECTION_METRICS}, got {metric!r}")
    if metric == "loss" and str(section_dict(config, "surrogate")["mode"]) == "exact":
        return "exact_loss"
    return metric


def stage_selection(config, workdir: str) -> dict:
    """Step 5: random-ensemble scores with bootstrap intervals; the chosen sources; baselines."""

    out = os.path.join(workdir, rundir.SELECTION_FILE)
    if os.path.isfile(out):
        return _read_selection(config, workdir, out)
    sel = section_dict(config, "selection")
    data = load_data(config.data)
    units = pipeline_units(config, workdir, data.sources)
    sources = units.names
    rows = read_estimates(os.path.join(workdir, rundir.ESTIMATES_FILE))
    metric = selection_metric(config)
    if rows and any(r.get(metric, "") == "" for r in rows):
        raise ValueError(f"config.selection.metric = {sel['metric']!r}: the estimates table "
                         f"{workdir}/estimates/estimates.csv has no {metric!r} values (accuracy and "
                         "mean_output need gradients.output_fn = 'logit_odds'; exact_loss needs "
                         "surrogate.mode = 'exact')")
    est = np.array([float(r[metric]) for r in rows])
    higher_is_better = metric in ("accuracy", "mean_output")
    subsets = np.array([[s in r["source_list"] for s in sources] for r in rows])
    ens = ensemble_scores(subsets, est if higher_is_better else -est, n_boot=int(sel["n_boot"]),
                          seed=int(sel["seed"]))
    scores = np.asarray(ens.scores)
    method = str(sel.get("method", "ensemble"))
    top = subset_size(int(np.sum(~np.isnan(scores))), sel["top"], name="config.selection.top")
    stepwise = None
    if method == "ensemble":
        picked = select_top(scores, top)
    elif method == "threshold":
        picked = select_threshold(scores, float(sel["threshold"]))
    else:
        picked, stepwise = _stepwise_selection(config, workdir, sources, scores, metric, top)
    if len(picked) == 0:
        raise ValueError(f"config.selection.method = {method!r} selected no source ("
                         + ("no ensemble score reaches selection.threshold = "
                            f"{float(sel['threshold'])}; the scores range from "
                            f"{np.nanmin(scores):.6g} to {np.nanmax(scores):.6g}, higher is "
                            "better" + ("" if higher_is_better else
                                        f": the negated estimated {metric}")
                            if method == "threshold" else
                            "no source improves the estimated target metric at θ* by more than "
                            f"selection.min_gain = {float(sel['min_gain'])}") + "); the estimates "
                         f"in {workdir}/estimates are kept")
    chosen = [sources[i] for i in sorted(int(i) for i in picked)]
    sizes = units.sizes()
    sim, rep, baselines = _baselines(config, workdir, data, units, chosen, sizes,
                                     seed=int(sel["seed"]))
    ranking = [sources[i] for i in np.argsort(-scores)]
    kinds = units.kinds(dict(data.kinds or {}))
    result = {
        "method": method, "stepwise": stepwise,
        "metric": metric, "higher_is_better": higher_is_better, "target": data.target,
        "sources": sources,
        "scores": scores, "ci_low": np.asarray(ens.ci_low), "ci_high": np.asarray(ens.ci_high),
        "counts": np.asarray(ens.counts), "ranking": ranking, "selected": chosen,
        "grad_sim_scores": sim, "repr_sim_scores": rep, "baselines": baselines, "kinds": kinds,
        "ranking_auc": ranking_auc(ranking, kinds),
    }
    if sizes is not None:
        result["groups"] = {"by": "cluster", "sizes": [sizes[u] for u in sources]}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    return write_shared_json(out, result, "selection")


def _read_selection(config, workdir: str, out: str) -> dict:
    """The selection already made (``out``), with the repr_sim baseline added when it was made
    before that baseline existed."""
    result = read_json(out)
    if "repr_sim" not in result["baselines"]:  # made before the repr_sim baseline existed
        data = load_data(config.data)
        rep = representation_similarity(config, workdir, data,
                                        pipeline_units(config, workdir, data.sources))
        k, sources = len(result["selected"]), result["sources"]
        result["repr_sim_scores"] = rep
        result["baselines"]["repr_sim"] = [sources[i] for i in sorted(np.argsort(-rep)[:k])]
        result = write_shared_json(out, result, "selection/repr_sim")
    return result


def _baselines(config, workdir: str, data, units, chosen: Sequence[str],
               sizes: dict[str, int] | None, *, seed: int):
    """``(grad_sim scores, repr_sim scores, {baseline: its units})``: each baseline picks as many
    units as the selection ``chosen`` (random clusters of unequal ``sizes``: as many samples)."""
    sources = units.names
    train = GradientStore.open(rundir.gradients_dir(workdir, "train"))
    target = GradientStore.open(rundir.gradients_dir(workdir, "target"))
    ids = units.row_ids(train.example_ids, train.source_ids)
    sim = np.asarray(gradient_similarity_scores(train.feats(), ids, target.feats(), n_sources=len(sources)))
    rep = representation_similarity(config, workdir, data, units)
    k = len(chosen)
    names = lambda idx: [sources[i] for i in sorted(int(i) for i in idx)]  # noqa: E731
    if sizes is None:  # whole sources: the same number of sources as the selection
        random_pick = baseline_random(len(sources), k, seed=seed)
    else:  # clusters of unequal sizes: random units of the selection's number of samples
        random_pick = baseline_random_total([sizes[u] for u in sources],
                                            sum(sizes[u] for u in chosen), seed=seed)
    baselines = {  # the same number of sources as the selection (all: every one)
        "all": names(baseline_all(len(sources))),
        "random": names(random_pick),
        "grad_sim": names(select_top(sim, k)),
        "repr_sim": names(select_top(rep, k)),
    }
    return sim, rep, baselines


def _stepwise_selection(config, workdir, sources, scores, metric, top):
    """``selection.method`` "forward" (greedy forward stepwise selection, at most
    ``selection.top`` sources) or "ordered" (the paper's single pass in ensemble-score order),
    each step scoring its candidate subsets with the surrogate in one batched call
    (:class:`SurrogateScorer`). Returns the chosen indices and a record of the search."""
    sel = section_dict(config, "selection")
    method = str(sel["method"])
    scorer = SurrogateScorer(config, workdir, sources)
    sign = 1.0 if metric in ("accuracy", "mean_output") else -1.0

    def score_fn(rows):
        return sign * np.asarray(scorer(rows)[metric], np.float64)

    t0 = time.time()
    min_gain = float(sel["min_gain"])
    if method == "forward":
        res = forward_selection(score_fn, len(sources), max_size=top, min_gain=min_gain)
    else:
        res = ordered_selection(scores, score_fn, min_gain=min_gain)
    record = {"order": [sources[i] for i in res.selected], "path_scores": list(res.path_scores),
              "initial_score": res.initial_score, "n_calls": res.n_calls,
              "n_evaluated": res.n_evaluated, "seconds": round(time.time() - t0, 3)}
    return np.asarray(res.selected, int), record


def representation_similarity(config, workdir: str, data, units=None) -> np.ndarray:
    """The representation-similarity baseline's scores: per unit (source, or group of
    ``units``), the cosine between its train examples' mean last-layer hidden state at θ* and
    the target validation examples' (the examples the target gradients are taken on);
    :mod:`jaxgrad.select.representations`."""
    units = units or Units.of_sources(data.sources)
    model, tokenizer = load_theta_star(config, workdir)
    kw = dict(sources=data.sources, max_length=int(config.train.max_length),
              batch_size=int(section_dict(config, "gradients")["batch_size"]))
    train = data.examples("train")
    reps = mean_representations(model, tokenizer, train, **kw)
    target = mean_representations(model, tokenizer, data.target_examples(), **kw)
    ids = units.row_ids([e["example_id"] for e in train], [e["source"] for e in train])
    return np.asarray(gradient_similarity_scores(reps, ids, target, n_sources=len(units.names)))


def ranking_auc(ranking: Sequence[str], kinds: dict) -> float | None:
    """P(a random good source ranks above a random bad one) (1 = every bad source at the bottom).

    Good = target/related, bad = noisy/unrelated; None when kinds are unknown or one side is empty.
    """
    good = [i for i, s in enumerate(ranking) if kinds.get(s) in ("target", "related")]
    bad = [i for i, s in enumerate(ranking) if kinds.get(s) in BAD_KINDS]
    if not good or not bad:
        return None
    return float(np.mean([[g < b for b in bad] for g in good]))
