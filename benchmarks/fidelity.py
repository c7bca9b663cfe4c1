r"""Fidelity of GradEx estimates on the demo config: real fine-tunes from θ* vs the estimates.

  python benchmarks/fidelity.py [--workdir=checkpoints/demo] [--subsets=21] [--optimizer=sgd]
      [--steps=1] [--learning-rate=0.5] [--batch-size=1200] [--max-grad-norm=0.1] [--no-write]

Needs a finished pipeline run (``make demo`` writes checkpoints/demo). For each of the first
``--subsets`` subsets of its estimates table, fine-tunes θ* on the subset (``jaxgrad.fidelity``)
and appends to benchmarks/RESULTS.md: relative error and Spearman correlation of the linearized
and exact estimates against the true target metric (level and change from θ*), at the config's
``surrogate.scale`` and at the scale ``jaxgrad.fidelity.suggest_scale`` calibrates from the real
updates' size, the paper's first-order error, the measured update ratios and direction cosines.

Defaults: one full-batch (the demo's subsets are 2 × 600 examples), normalised gradient step
(SGD, every gradient clipped to norm 0.1, so each subset moves the adapters the same distance as
the surrogate's Δ_S does) of length 0.05, about 0.002 of ‖θ*‖: the short, small update from θ* that
Δ_S approximates (a gradient step on S, in the linear regime). Longer or Adam fine-tunes:
``--optimizer=adamw --learning-rate=2.5e-4``, ``--steps=8 --batch-size=32 --learning-rate=0.0625``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys

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
    ap.add_argument("--workdir", default=os.path.join(ROOT, "checkpoints", "demo"))
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

    from configs import demo
    from jaxgrad.fidelity import run_fidelity

    config = demo.get_config()
    config.fidelity = ml_collections.ConfigDict(dict(
        num_subsets=args.subsets, steps=args.steps, learning_rate=args.learning_rate,
        optimizer=args.optimizer, batch_size=args.batch_size, max_grad_norm=args.max_grad_norm,
        calibrate=True))
    config.train.progress = False
    shutil.rmtree(os.path.join(args.workdir, "fidelity"), ignore_errors=True)
    out = run_fidelity(config, args.workdir)
    cpu = cpu_model()
    st, cal = out["settings"], out["calibrated"]
    scale = config.surrogate.scale
    command = (f"python benchmarks/fidelity.py --subsets={args.subsets} --optimizer={args.optimizer} "
               f"--steps={args.steps} --learning-rate={args.learning_rate} "
               f"--batch-size={args.batch_size} --max-grad-norm={args.max_grad_norm}")
    lines = [
        "", f"## Fidelity: estimates vs short fine-tunes from θ* (CPU, demo config, {datetime.date.today()})",
        "",
        f"- machine: {cpu}, {os.cpu_count()} cores; jax {jax.__version__}",
        f"- command: `{command}` on a `make demo` run directory (configs/demo.py: "
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
    publish(lines, write=not args.no_write)


if __name__ == "__main__":
    main()
