r"""Fidelity of GradEx estimates on the demo config: real fine-tunes from θ* vs the estimates.

  python benchmarks/fidelity.py [--workdir=checkpoints/demo] [--subsets=21] [--optimizer=sgd]
      [--steps=1] [--learning-rate=0.5] [--batch-size=1200] [--max-grad-norm=0.1] [--no-write]

Needs a finished pipeline run (``make demo`` writes checkpoints/demo). For each of the first
``--subsets`` subsets of its estimates table, fine-tunes θ* on the subset (``jaxgrad.pipeline.fidelity``)
and appends to benchmarks/RESULTS.md: relative error and Spearman correlation of the linearized
and exact estimates against the true target metric (level and change from θ*), at the config's
``surrogate.scale`` and at the scale ``jaxgrad.pipeline.fidelity.suggest_scale`` calibrates from the real
updates' size, the paper's first-order error, the measured update ratios and direction cosines.

Defaults: one full-batch (the demo's subsets are 2 × 600 examples), normalised gradient step
(SGD, every gradient clipped to norm 0.1, so each subset moves the adapters the same distance as
the surrogate's Δ_S does) of length 0.05, about 0.002 of ‖θ*‖: the short, small update from θ* that
Δ_S approximates (a gradient step on S, in the linear regime). Longer or Adam fine-tunes:
``--optimizer=adamw --learning-rate=2.5e-4``, ``--steps=8 --batch-size=32 --learning-rate=0.0625``.

On the real model (``make real`` first; the fine-tunes resume, and each is measured once into
``fidelity/subset_<i>/truth.npz``, so ``--variants`` re-score them under other surrogate settings
in seconds):

  python benchmarks/fidelity.py --config=configs/smollm2_bigbench.py:cpu --workdir=checkpoints/real
      --subsets=16 --optimizer=adamw --steps=24 --learning-rate=1e-3 --batch-size=8
      --max-grad-norm=-1 --variants=objective=taylor,objective=one_class,C=0.01

(24 steps of 8 = one epoch of a subset of 6 sources x 32 examples; AdamW at the meta-training
learning rate, constant, gradient clipping as in training.) With a config other than the demo's
the ``fidelity`` section of benchmarks/results/real_model.json is written too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import cpu_model, publish  # noqa: E402  (benchmarks/common.py)

GOAL_REL, GOAL_SPEARMAN = 0.05, 0.8


def _row(name: str, v: dict) -> str:
    return (f"| {name} | {v['relative_error']:.3f} | {v['spearman']:.3f} | "
            f"{v.get('change_relative_error', float('nan')):.3f} | "
            f"{v.get('change_pearson', float('nan')):.3f} | {v.get('sign_agreement', float('nan')):.2f} |")


def _meets(v: dict) -> bool:
    return v["relative_error"] <= GOAL_REL and v["spearman"] >= GOAL_SPEARMAN


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.py")
    ap.add_argument("--workdir", default=os.path.join(ROOT, "checkpoints", "demo"))
    ap.add_argument("--variants", default="",
                    help="comma-separated surrogate settings key=value, each re-scored on the same "
                         "fine-tunes (e.g. objective=taylor,C=0.01)")
    ap.add_argument("--fresh", action="store_true", help="delete <workdir>/fidelity first")
    ap.add_argument("--repeat-subsets", type=int, default=0,
                    help="the noise of the truth itself: fine-tune the first N subsets again with "
                         "train.seed + 1 (another data order), in <workdir>_fidelity_seed<s>")
    ap.add_argument("--subsets", type=int, default=21)
    ap.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--learning-rate", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=1200, help="0 = train.batch_size")
    ap.add_argument("--max-grad-norm", type=float, default=0.1,
                    help="gradient clipping of the fine-tunes (< 0: train.max_grad_norm, 0: off)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import jax
    import ml_collections

    from common import load_config
    from jaxgrad.pipeline.fidelity import run_fidelity

    config = load_config(args.config)
    config.fidelity = ml_collections.ConfigDict(dict(
        num_subsets=args.subsets, steps=args.steps, learning_rate=args.learning_rate,
        optimizer=args.optimizer, batch_size=args.batch_size, max_grad_norm=args.max_grad_norm,
        calibrate=True))
    config.train.progress = False
    if args.fresh:
        shutil.rmtree(os.path.join(args.workdir, "fidelity"), ignore_errors=True)
    t0 = time.time()
    out = run_fidelity(config, args.workdir)
    seconds = time.time() - t0
    variants = {}
    for item in filter(None, args.variants.split(",")):
        key, _, value = item.partition("=")
        v_config = config.copy_and_resolve_references()
        old = v_config.surrogate[key]
        v_config.surrogate[key] = ((value.lower() in ("1", "true")) if isinstance(old, bool)
                                   else type(old)(value))
        variants[item] = run_fidelity(v_config, args.workdir, write=False)
    repeat = _repeat(config, args) if args.repeat_subsets else None
    cpu = cpu_model()
    st, cal = out["settings"], out["calibrated"]
    scale = config.surrogate.scale
    command = (f"python benchmarks/fidelity.py --config={args.config} --workdir={args.workdir} "
               f"--subsets={args.subsets} --optimizer={args.optimizer} "
               f"--steps={args.steps} --learning-rate={args.learning_rate} "
               f"--batch-size={args.batch_size} --max-grad-norm={args.max_grad_norm}"
               + (f" --variants={args.variants}" if args.variants else ""))
    demo_run = args.config.startswith("configs/demo.py")
    lines = [
        "", f"## Fidelity: estimates vs {'short ' if demo_run else ''}fine-tunes from θ* (CPU, "
        f"{args.config}, {datetime.date.today()})",
        "",
        f"- machine: {cpu}, {os.cpu_count()} cores; jax {jax.__version__}",
        f"- command: `{command}` ({seconds:.0f} s) on a finished run directory ({args.config}: "
        f"{st['num_subsets']} subsets, output `{config.gradients.output_fn}`, k = "
        f"{config.gradients.projection_dim}, C = {st['C']}, surrogate.scale = {scale})",
        f"- true fine-tune per subset: {st['steps']} step(s) of {st['optimizer']} at constant lr "
        f"{st['learning_rate']}, batch {st['batch_size']}, gradient clipping {st['max_grad_norm']}; "
        f"metric = the estimates table's `loss` (mean target validation token cross-entropy; "
        f"{out['theta_star_loss']:.4f} at θ*)",
        "",
        "| estimate | level: mean relative error | Spearman | change: Σ\\|Δest−Δtrue\\|/Σ\\|Δtrue\\| "
        "| change: Pearson | sign agreement |",
        "|---|---|---|---|---|---|",
    ]
    for key, v in out["summary"].items():
        lines.append(_row(f"{key}, scale {scale}", v))
    for key in ("linearized", "exact"):
        lines.append(_row(f"{key}, calibrated scale {cal['scale']:.4f}", cal[key]))
    lines.append(_row("first order of the real update (diagnostic)", out["first_order_true"]))
    lin, lin_cal = out["summary"]["linearized"], cal["linearized"]
    met = [name for name, v in (("linearized at the config scale", lin),
                                ("exact at the config scale", out["summary"]["exact"]),
                                ("linearized at the calibrated scale", lin_cal),
                                ("exact at the calibrated scale", cal["exact"])) if _meets(v)]
    lines += [
        "",
        f"First-order error (mean squared relative error of f(θ*)+gᵀΔ against f(θ*+Δ), config "
        f"scale): {out['first_order_error']:.2e}. Real updates: median ‖θ_S − θ*‖/‖θ*‖ = "
        f"{out['update_ratio_median']:.4f}, median ‖Pᵀ(θ_S − θ*)‖/‖θ*‖ = "
        f"{out['projected_update_ratio_median']:.4f}; mean cosine of Pᵀ(θ_S − θ*) with the "
        f"surrogate's w_S: {out['direction_cosine_mean']:.3f}. Calibrated scale (suggest_scale: "
        f"c_S‖w_S‖ = ‖Pᵀ(θ_S − θ*)‖, median over subsets): {cal['scale']:.4f}.",
        "",
        f"Goals (level relative error <= {GOAL_REL:.0%}, Spearman >= {GOAL_SPEARMAN}): "
        + (f"met by {', '.join(met)}." if met else "not met by any estimate.")
        + f" Spearman is the same for levels and changes (loss(θ*) is common to all subsets) and "
        f"does not depend on the scale for the linearized estimate; the level's relative error "
        f"is small whenever updates are small, so the change columns are the stricter test "
        f"(linearized change error {lin['change_relative_error']:.2f} at scale {scale}, "
        f"{lin_cal['change_relative_error']:.2f} calibrated).",
    ]
    acc = out["accuracy_spearman"]
    if out.get("theta_star_accuracy") == out.get("theta_star_accuracy"):  # not NaN
        lines += ["", f"Answer accuracy (most likely answer, target validation): "
                  f"{out['theta_star_accuracy']:.3f} at θ*, fine-tunes "
                  f"{min(r['true_accuracy'] for r in out['rows']):.3f}–"
                  f"{max(r['true_accuracy'] for r in out['rows']):.3f}. Spearman with the true "
                  f"accuracy (signed so + = lower loss goes with higher accuracy): linearized "
                  f"{acc['linearized']:.3f}, exact {acc['exact']:.3f}, the true loss itself "
                  f"{acc['true_loss']:.3f}."]
    if repeat:
        lines += ["", f"Noise of the truth (the first {repeat['num_subsets']} subsets fine-tuned "
                  f"again with train.seed {repeat['seed']}, another data order): the true "
                  f"loss changes by {repeat['seed_sd']:.4f} (RMS over subsets, of the difference "
                  f"/ √2), against a spread of {repeat['between_sd']:.4f} (SD) between "
                  f"subsets; the two seeds' true losses have Spearman {repeat['spearman']:.3f} "
                  f"and Pearson {repeat['pearson']:.3f} with each other, the ceiling of any "
                  f"estimate's agreement with one seed's truth."]
    if variants:
        lines += ["", "Other surrogate settings on the same fine-tunes (Spearman against the true "
                  "loss; change Pearson; calibrated scale):", "",
                  "| surrogate setting | linearized Spearman | exact Spearman | linearized change "
                  "Pearson | calibrated scale | exact Spearman, calibrated |",
                  "|---|---|---|---|---|---|"]
        for name, v in [(f"config ({config.surrogate.objective}, C={config.surrogate.C})", out),
                        *variants.items()]:
            c = v.get("calibrated") or {}
            lines.append(f"| {name} | {v['summary']['linearized']['spearman']:.3f} | "
                         f"{v['summary']['exact']['spearman']:.3f} | "
                         f"{v['summary']['linearized']['change_pearson']:.3f} | "
                         f"{c.get('scale', float('nan')):.4f} | "
                         f"{(c.get('exact') or {}).get('spearman', float('nan')):.3f} |")
    publish(lines, write=not args.no_write)
    if not args.no_write and not demo_run:
        from common import update_results

        n_sub = [len(data_examples) for data_examples in _subset_sizes(config, out)]
        update_results(
            os.path.join(ROOT, "benchmarks", "results", "real_model.json"),
            fidelity={"command": command, "date": str(datetime.date.today()),
                      "seconds": round(seconds, 1), "num_subsets": st["num_subsets"],
                      "finetune_steps": st["steps"], "batch_size": st["batch_size"],
                      "finetune_epochs": round(st["steps"] * st["batch_size"] / max(n_sub), 3),
                      "optimizer": st["optimizer"], "learning_rate": st["learning_rate"],
                      "spearman_linearized": lin["spearman"],
                      "spearman_exact": out["summary"]["exact"]["spearman"],
                      "pearson_linearized": lin["change_pearson"],
                      "change_relative_error_linearized": lin["change_relative_error"],
                      "calibrated": cal, "accuracy_spearman": acc,
                      "theta_star_loss": out["theta_star_loss"],
                      "theta_star_accuracy": out["theta_star_accuracy"],
                      "first_order_error_config_scale": out["first_order_error"],
                      "update_ratio_median": out["update_ratio_median"],
                      "direction_cosine_mean": out["direction_cosine_mean"],
                      "rows": [{k: r[k] for k in ("subset", "sources", "true_loss", "true_accuracy",
                                                  "linearized_loss_refit", "exact_loss")}
                               for r in out["rows"]],
                      "truth_noise": repeat,
                      "variants": {k: {"spearman_linearized": v["summary"]["linearized"]["spearman"],
                                       "spearman_exact": v["summary"]["exact"]["spearman"],
                                       "pearson_linearized": v["summary"]["linearized"]["change_pearson"],
                                       "calibrated": v.get("calibrated")}
                                   for k, v in variants.items()}})


def _repeat(config, args) -> dict:
    """Fine-tune the first ``--repeat-subsets`` subsets again under train.seed + 1, in a copy of
    the run directory's θ*, gradients and estimates; the truth's test-retest agreement."""
    import numpy as np

    from jaxgrad.pipeline.fidelity import _pearson, _spearman, run_fidelity

    seed = int(config.train.seed) + 1
    workdir = f"{args.workdir.rstrip('/')}_fidelity_seed{seed}"
    for part in ("meta_train", "gradients", "estimates"):
        if not os.path.isdir(os.path.join(workdir, part)):
            shutil.copytree(os.path.join(args.workdir, part), os.path.join(workdir, part + ".tmp"))
            os.replace(os.path.join(workdir, part + ".tmp"), os.path.join(workdir, part))
    c = config.copy_and_resolve_references()
    c.train.seed = seed
    c.fidelity.num_subsets = args.repeat_subsets
    c.fidelity.calibrate = False
    again = run_fidelity(c, workdir)["rows"]
    with open(os.path.join(args.workdir, "fidelity", "fidelity.json")) as f:
        first = {r["subset"]: r["true_loss"] for r in json.load(f)["rows"]}
    a = np.array([first[r["subset"]] for r in again])
    b = np.array([r["true_loss"] for r in again])
    return {"seed": seed, "num_subsets": len(again), "workdir": workdir,
            "seed_sd": float(np.sqrt(np.mean((a - b) ** 2) / 2)),
            "between_sd": float(np.std(list(first.values()))),
            "spearman": _spearman(a, b), "pearson": _pearson(a, b),
            "true_loss_seed0": a.tolist(), f"true_loss_seed{seed}": b.tolist()}


def _subset_sizes(config, out):
    """The training examples of each fine-tuned subset (for the epochs the steps make)."""
    from jaxgrad.estimate.stage import subset_sources
    from jaxgrad.data.sources import load_data

    data = load_data(config.data)
    return [data.examples("train", subset_sources(r["sources"])) for r in out["rows"]]


if __name__ == "__main__":
    main()
