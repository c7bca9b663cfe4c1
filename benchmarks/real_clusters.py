r"""The paper's chain-of-thought protocol on the real LM: StrategyQA's samples in clusters.

  python scripts/prepare_real.py --config=configs/smollm2_bigbench.py:cpu   # assets, once
  python benchmarks/real_clusters.py [--config=configs/smollm2_bigbench.py:clusters]
      [--workdir=checkpoints/real_clusters]

Runs (or resumes) the pipeline of ``configs/smollm2_bigbench.py:clusters`` (SmolLM2-135M, the
200 StrategyQA training samples in 20 average-linkage clusters of their projected gradients,
random-ensemble selection of the top 80% of clusters, four final fine-tunes of the base), then:

* per final fine-tune (selection, all clusters, random clusters of the same number of samples,
  the most gradient-similar clusters): test loss, the mean over the test questions of each one's
  token cross-entropy of the answer and rationale, with a 95% bootstrap interval over the
  questions (2,000 resamples), and the paired difference to the selection's run with its
  interval; accuracy of the generated answer (leading Yes/No, exact match) with a Wilson 95%
  interval;
* forward stepwise selection (``jaxgrad.select.forward_selection`` on the surrogate, at most
  as many clusters as the ensemble keeps, one batched surrogate call per round) against the
  random-ensemble selection on the same estimates: what each picks and how long each takes
  (wall time of the selector alone, after the surrogate's inputs are loaded; the first forward
  round includes its compilation).

Appends "## Real model: clusters of StrategyQA samples (the paper's CoT protocol)" to
benchmarks/RESULTS.md and writes benchmarks/results/real_clusters.json. About 30 minutes on 2
cores, alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from common import RESULTS, append_section, cpu_model, load_config, update_results  # noqa: E402
from real_selection import wilson  # noqa: E402

HEADING = "## Real model: clusters of StrategyQA samples (the paper's CoT protocol)"
JSON_PATH = os.path.join(ROOT, "benchmarks", "results", "real_clusters.json")
N_BOOT = 2000


def per_question_losses(config, run_dir: str) -> np.ndarray:
    """Token cross-entropy of each test question's completion under a final fine-tune's adapter
    (``outputs.token_ce``: the mean over the completion's tokens), float64 [n_test]."""
    import jax.numpy as jnp

    from jaxgrad.data.batching import collate
    from jaxgrad.models.forward import encode_for_model, model_logits
    from jaxgrad.models import load_peft_adapter
    from jaxgrad.gradients.outputs import token_ce
    from jaxgrad.config import ModelSpec
    from jaxgrad.data.sources import load_data
    from jaxgrad.models.loading import load_model, lora_from_config

    data = load_data(config.data)
    model, tok = load_model(ModelSpec.from_config(config.model), lora_from_config(config.lora))
    load_peft_adapter(model, os.path.join(run_dir, "adapter"))
    examples = data.target_examples("test")
    enc, arch = encode_for_model(examples, tok, model, sources=data.sources)
    out = []
    for i in range(0, len(examples), 8):
        batch = collate(enc, list(range(i, min(i + 8, len(examples)))),
                        max_length=int(config.train.max_length), arch=arch)
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        out.append(np.asarray(token_ce(model_logits(model, batch), batch["targets"],
                                       batch["target_mask"]), np.float64))
    return np.concatenate(out)


def bootstrap_ci(x: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of ``x`` over ``N_BOOT`` resamples of its entries."""
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (N_BOOT, len(x)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def compare_selectors(config, workdir: str) -> dict:
    """Random-ensemble and forward stepwise selection on the run's estimates: picks and times."""
    from jaxgrad.estimate.scorer import SurrogateScorer
    from jaxgrad.estimate.stage import read_estimates
    from jaxgrad.groups.stage import pipeline_units
    from jaxgrad.select.stage import selection_metric
    from jaxgrad.rundir import resolved_config
    from jaxgrad.estimate.subsets import subset_size
    from jaxgrad.select.scores import ensemble_scores, select_top
    from jaxgrad.select.stepwise import forward_selection

    config = resolved_config(config, workdir)
    units = pipeline_units(config, workdir).names
    rows = read_estimates(os.path.join(workdir, "estimates", "estimates.csv"))
    metric = selection_metric(config)
    sign = 1.0 if metric in ("accuracy", "mean_output") else -1.0
    est = sign * np.array([float(r[metric]) for r in rows])
    subsets = np.array([[u in r["source_list"] for u in units] for r in rows])
    top = subset_size(len(units), config.selection.top, name="config.selection.top")
    t0 = time.perf_counter()
    ens = ensemble_scores(subsets, est, n_boot=int(config.selection.n_boot),
                          seed=int(config.selection.seed))
    ensemble = sorted(int(i) for i in select_top(np.asarray(ens.scores), top))
    t_ens = time.perf_counter() - t0
    scorer = SurrogateScorer(config, workdir, units)
    score_fn = lambda r: sign * np.asarray(scorer(r)[metric], np.float64)  # noqa: E731
    t0 = time.perf_counter()
    fwd = forward_selection(score_fn, len(units), max_size=top)
    t_fwd = time.perf_counter() - t0
    both = sorted(set(ensemble) & set(fwd.selected))
    return {
        "ensemble": {"selected": [units[i] for i in ensemble], "seconds": round(t_ens, 3),
                     "subsets_fitted": len(rows)},
        "forward": {"order": [units[i] for i in fwd.selected],
                    "path_scores": [float(v) for v in fwd.path_scores],
                    "initial_score": float(fwd.initial_score), "seconds": round(t_fwd, 3),
                    "subsets_fitted": int(fwd.n_evaluated), "batched_calls": int(fwd.n_calls)},
        "both": [units[i] for i in both],
        "estimated_metric_of": {
            "ensemble": float(score_fn(np.isin(np.arange(len(units)), ensemble)[None])[0]),
            "forward": float(fwd.path_scores[-1]) if fwd.path_scores else float(fwd.initial_score)},
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/smollm2_bigbench.py:clusters")
    ap.add_argument("--workdir", default="checkpoints/real_clusters")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    from jaxgrad.pipeline import run_pipeline
    from jaxgrad.data.sources import load_data

    config = load_config(args.config)
    config.train.progress = False
    t0 = time.time()
    out = run_pipeline(config, args.workdir)
    wall = round(time.time() - t0, 1)
    timings = [json.loads(line) for line in open(os.path.join(args.workdir, "timings.jsonl"))]
    stage_seconds = {}
    for r in timings:
        if not r.get("reused"):
            stage_seconds[r["stage"]] = r["seconds"]
    data = load_data(config.data)
    n_test = len(data.target_examples("test"))
    groups = json.load(open(os.path.join(args.workdir, "groups", "groups.json")))
    sizes = {u["name"]: u["size"] for u in groups["units"]}
    sel = json.load(open(os.path.join(args.workdir, "selection", "selection.json")))
    losses, runs = {}, {}
    for name in config.pipeline.finetune_runs:
        run_dir = os.path.join(args.workdir, "finetune", name)
        rec = json.load(open(os.path.join(run_dir, "sources.json")))
        losses[name] = per_question_losses(config, run_dir)
        acc = rec["metrics"]["test_acc"]
        runs[name] = {"clusters": rec["sources"], "n_train": sum(sizes[u] for u in rec["sources"]),
                      "test_loss": float(losses[name].mean()),
                      "test_loss_ci95": bootstrap_ci(losses[name]),
                      "test_accuracy": acc, "test_accuracy_ci95": wilson(acc * n_test, n_test)}
    for name in runs:
        diff = losses["selection"] - losses[name]
        runs[name]["loss_minus_selection_ci95"] = (
            None if name == "selection" else tuple(-v for v in bootstrap_ci(diff)[::-1]))
        runs[name]["loss_minus_selection"] = None if name == "selection" else float(-diff.mean())
    selectors = compare_selectors(config, args.workdir)
    result = {"date": str(datetime.date.today()), "machine": f"{cpu_model()}, {os.cpu_count()} "
              "cores", "config": args.config, "workdir": args.workdir, "wall_seconds": wall,
              "stage_seconds": stage_seconds, "n_test": n_test, "cluster_sizes": sizes,
              "selected": sel["selected"], "runs": runs, "selectors": selectors,
              "groups_seconds": groups.get("seconds")}
    write(args, result, out)


def write(args, r: dict, out: dict) -> None:
    cmd = f"python benchmarks/real_clusters.py --config={args.config} --workdir={args.workdir}"
    sizes = r["cluster_sizes"]
    lines = [f"### {args.config} ({r['date']})", "",
             f"- machine: {r['machine']}; command: `{cmd}` ({r['wall_seconds']:.0f} s this call)",
             "- stage seconds (when computed): " + ", ".join(
                 f"{k} {v:.0f}" for k, v in r["stage_seconds"].items()),
             f"- 200 StrategyQA training samples in {len(sizes)} clusters (average linkage, cosine, "
             f"on k = 2048 projected gradients at θ*; {r['groups_seconds']} s): sizes "
             f"{sorted(sizes.values(), reverse=True)}",
             f"- kept by the random ensemble (top 80%): {', '.join(r['selected'])}",
             f"- {r['n_test']} test questions; loss = mean token cross-entropy of answer and "
             "rationale per question, 95% bootstrap interval over questions; Δ = run minus "
             "selection, paired over the same questions; accuracy = leading Yes/No of a greedy "
             "generation, Wilson 95% interval", "",
             "| run | clusters | train samples | test loss [95% CI] | Δ loss vs selection [95% CI] "
             "| accuracy [95% CI] |", "|---|---|---|---|---|---|"]
    for name, v in r["runs"].items():
        lo, hi = v["test_loss_ci95"]
        alo, ahi = v["test_accuracy_ci95"]
        d = ("–" if v["loss_minus_selection"] is None else
             f"{v['loss_minus_selection']:+.4f} [{v['loss_minus_selection_ci95'][0]:+.4f}, "
             f"{v['loss_minus_selection_ci95'][1]:+.4f}]")
        lines.append(f"| {name} | {len(v['clusters'])} | {v['n_train']} | {v['test_loss']:.4f} "
                     f"[{lo:.4f}, {hi:.4f}] | {d} | {v['test_accuracy']:.3f} [{alo:.2f}, "
                     f"{ahi:.2f}] |")
    s = r["selectors"]
    lines += ["", "Forward stepwise selection against the random ensemble, on the same estimates:",
              "", "| selector | clusters picked | subsets fitted | seconds | estimated target loss "
              "of its pick |", "|---|---|---|---|---|",
              f"| random ensemble (top 80%) | {', '.join(s['ensemble']['selected'])} | "
              f"{s['ensemble']['subsets_fitted']} (the estimates stage: {r['stage_seconds'].get('estimates', 0):.0f} s) | "
              f"{s['ensemble']['seconds']:.3f} | {-s['estimated_metric_of']['ensemble']:.4f} |",
              f"| forward stepwise (≤ {len(s['ensemble']['selected'])}) | "
              f"{', '.join(s['forward']['order'])} (in order) | {s['forward']['subsets_fitted']} "
              f"in {s['forward']['batched_calls']} batched calls | {s['forward']['seconds']:.1f} | "
              f"{-s['estimated_metric_of']['forward']:.4f} |", "",
              f"Picked by both: {len(s['both'])} of {len(s['ensemble']['selected'])}."]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        append_section(RESULTS, HEADING, text)
        update_results(JSON_PATH, clusters=r)


if __name__ == "__main__":
    main()
