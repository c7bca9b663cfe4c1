r"""The paper's first-order test at θ* of a finished run: f(θ*) + gᵀΔ against f(θ* + Δ).

  python benchmarks/first_order.py --config=configs/smollm2_bigbench.py:cpu --workdir=checkpoints/real
  python benchmarks/first_order.py --config=configs/demo.py --workdir=checkpoints/demo

Perturbations Δ of the LoRA parameters with ‖Δ‖ = s·‖θ*_LoRA‖, s in {0.02, 0.05, 0.1}, 5 seeds
each, in random directions and in the surrogate's (the lifted solutions P w_S of the first 5
subsets of the estimates table); on the target's validation samples, the mean squared relative
error of the first-order prediction and of the no-gradient baseline f(θ*)
(:func:`jaxgrad.pipeline.fidelity.first_order_error`). Appends to benchmarks/RESULTS.md under "## First-order
error (the paper's protocol)" and writes the ``first_order`` section of
``--results`` (default: benchmarks/results/real_model.json for the real config,
benchmarks/results/demo.json otherwise). About 2 minutes on 2 cores for the real run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import RESULTS, append_section, cpu_model, load_config, update_results  # noqa: E402

HEADING = "## First-order error (the paper's protocol)"
GOAL = 0.01  # the paper: about 1% at s = 0.1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/smollm2_bigbench.py:cpu")
    ap.add_argument("--workdir", default="checkpoints/real")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--results", default="")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import jax

    from jaxgrad.pipeline.fidelity import FIRST_ORDER_SCALES, first_order_error

    config = load_config(args.config)
    t0 = time.time()
    out = first_order_error(config, args.workdir, scales=FIRST_ORDER_SCALES, seeds=args.seeds)
    seconds = time.time() - t0
    real = "smollm2" in args.config
    results = args.results or os.path.join(ROOT, "benchmarks", "results",
                                           "real_model.json" if real else "demo.json")
    command = (f"python benchmarks/first_order.py --config={args.config} --workdir={args.workdir}"
               f" --seeds={args.seeds}")
    model = config.model.name_or_path or "scratch (configs/demo.py)"
    lines = [f"### {args.config} at θ* of `{args.workdir}` ({datetime.date.today()})", "",
             f"- machine: {cpu_model()}, {os.cpu_count()} cores; jax {jax.__version__}; "
             f"{seconds:.0f} s",
             f"- command: `{command}`",
             f"- model: {model}; D = {out['D']:,} LoRA parameters, ‖θ*‖ = {out['theta_norm']:.3f}; "
             f"output f = `{out['output_fn']}` on {out['num_samples']} target validation samples",
             "", "| direction | s = ‖Δ‖/‖θ*‖ | first-order error (mean ± sd over seeds) | "
             "no-gradient baseline | error / baseline |", "|---|---|---|---|---|"]
    for kind, per in out["results"].items():
        for s, v in per.items():
            lines.append(f"| {kind} | {s} | {v['mean']:.2e} ± {v['mean_std']:.1e} | "
                         f"{v['baseline_mean']:.2e} | {v['mean'] / v['baseline_mean']:.3f} |")
    top = str(max(FIRST_ORDER_SCALES))
    worst = max(per[top]["mean"] for per in out["results"].values())
    lines += ["", f"Error = mean over samples and seeds of ((f(θ*) + gᵀΔ − f(θ*+Δ)) / "
              f"max(|f(θ*+Δ)|, |f(θ*)|))², gᵀΔ exact (jax.jvp). Goal (the paper's ~1%): error ≤ "
              f"{GOAL} at s = {top}: {'met' if worst <= GOAL else 'not met'} (worst direction "
              f"{worst:.2e})."]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        append_section(RESULTS, HEADING, text)
        update_results(results, first_order={
            "config": args.config, "command": command, "date": str(datetime.date.today()),
            "seconds": round(seconds, 1), "D": out["D"], "theta_norm": out["theta_norm"],
            "num_samples": out["num_samples"], "output_fn": out["output_fn"],
            **{kind: per for kind, per in out["results"].items()},
            # the contract: per scale, mean and baseline_mean (random directions)
            **{s: {"mean": v["mean"], "baseline_mean": v["baseline_mean"]}
               for s, v in out["results"]["random"].items()}},
            **({"model": model} if real else {}))


if __name__ == "__main__":
    main()
