r"""Fidelity of GradEx estimates on the demo config: real fine-tunes from θ* vs the estimates.

  python benchmarks/fidelity.py [--workdir=checkpoints/demo] [--subsets=8] [--steps=60]

Needs a finished pipeline run (``make demo`` writes checkpoints/demo). For each of the first
``--subsets`` subsets of its estimates table, fine-tunes θ* on the subset (``jaxgrad.fidelity``),
and appends to benchmarks/RESULTS.md: mean relative error and Spearman correlation of the
linearized and exact estimates against the true target metric, the paper's first-order error and
the measured update ratio ‖θ_S − θ*‖ / ‖θ*‖ (what ``surrogate.scale`` stands in for).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=os.path.join(ROOT, "checkpoints", "demo"))
    ap.add_argument("--subsets", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--learning-rate", type=float, default=1e-2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import jax

    from configs import demo
    from jaxgrad.fidelity import run_fidelity

    import ml_collections

    config = demo.get_config()
    config.fidelity = ml_collections.ConfigDict(
        dict(num_subsets=args.subsets, steps=args.steps, learning_rate=args.learning_rate))
    config.train.progress = False
    shutil.rmtree(os.path.join(args.workdir, "fidelity"), ignore_errors=True)
    out = run_fidelity(config, args.workdir)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    lines = [
        "", "## Fidelity: estimates vs real fine-tuning (CPU, demo config)", "",
        f"- date: {datetime.date.today()}; machine: {cpu}, {os.cpu_count()} cores; jax {jax.__version__}",
        f"- command: `python benchmarks/fidelity.py --subsets={args.subsets} --steps={args.steps} "
        f"--learning-rate={args.learning_rate}` on a `make demo` run directory",
        f"- each subset: LoRA fine-tuning from θ* for {args.steps} steps; metric = the estimates table's "
        f"`loss` (output `{config.gradients.output_fn}`); surrogate scale {config.surrogate.scale}",
        "",
        "| estimate | mean relative error | Spearman (vs true) |",
        "|---|---|---|",
    ]
    for key, v in out["summary"].items():
        lines.append(f"| {key} | {v['relative_error']:.3f} | {v['spearman']:.3f} |")
    lines += [
        "",
        f"First-order error (mean squared relative error of f(θ*)+gᵀΔ against f(θ*+Δ)): "
        f"{out['first_order_error']:.2e}. Median update ratio of the real fine-tunes "
        f"‖θ_S − θ*‖/‖θ*‖: {out['update_ratio_median']:.3f} (the surrogate's Δ is scaled to "
        f"{config.surrogate.scale}).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        with open(os.path.join(ROOT, "benchmarks", "RESULTS.md"), "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
