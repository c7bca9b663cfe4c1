r"""Selection on the real LM over seeds: the final fine-tunes of the selection and of every baseline.

  python benchmarks/real_selection.py [--config=configs/smollm2_bigbench.py:cpu]
      [--workdir=checkpoints/real] [--seeds=3]

Needs ``make real`` (its run directory is seed 0). Seed s > 0 runs the pipeline into
``<workdir>_seed<s>`` with ``surrogate.seed`` (subset sampling), ``gradients.projection_seed``
(P), ``selection.seed`` (bootstrap, random baseline) and ``pipeline.finetune_seed`` (the final
fine-tunes' data order and adapter initialisation) set to s; the meta-training θ* of seed 0 is
copied in and serves every seed (one meta-training: the CPU budget). The runs resume.

Per seed and run (selection, all, random, grad_sim, repr_sim; equal step budgets,
``pipeline.finetune_steps``): target test loss, accuracy of the generated answer (exact match of
the leading Yes/No) and of the most likely answer (``jaxgrad.train.evaluate.choice_accuracy``), each accuracy with a
Wilson 95% interval over the test questions, and the planted-source ranking AUC. Appends to
benchmarks/RESULTS.md under "## Selection on the real LM (seeds)" and writes the ``selection``
section of benchmarks/results/real_model.json. About 30 minutes per new seed on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import RESULTS, append_section, cpu_model, load_config, update_results  # noqa: E402

HEADING = "## Selection on the real LM (seeds)"
JSON_PATH = os.path.join(ROOT, "benchmarks", "results", "real_model.json")


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (95% by default)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    d = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, mid - half), min(1.0, mid + half)


def seed_config(spec: str, seed: int):
    config = load_config(spec)
    config.train.progress = False
    if seed:
        config.surrogate.seed = seed
        config.gradients.projection_seed = seed
        config.selection.seed = seed
        config.pipeline.finetune_seed = seed
    return config


def prepare_seed_dir(base: str, workdir: str) -> None:
    """A run directory for another seed holding seed 0's θ* (meta_train) and its record."""
    if os.path.isdir(os.path.join(workdir, "meta_train")):
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(base, "stages.json")) as f:
        records = json.load(f)
    records["stages"] = {k: v for k, v in records["stages"].items() if k in ("base", "meta_train")}
    with open(os.path.join(workdir, "stages.json"), "w") as f:
        json.dump(records, f, indent=1)
    tmp = os.path.join(workdir, "meta_train.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(os.path.join(base, "meta_train"), tmp)
    os.replace(tmp, os.path.join(workdir, "meta_train"))  # complete or absent


def choice_accuracy_of_run(config, run_dir: str) -> float:
    """Most-likely-answer accuracy on the target's test split of a final fine-tune's adapter
    (for runs made before the finetune stage recorded ``test_choice_acc``)."""
    from jaxgrad.train.evaluate import choice_accuracy, target_choices
    from jaxgrad.models import load_peft_adapter
    from jaxgrad.config import ModelSpec
    from jaxgrad.data.sources import load_data
    from jaxgrad.models.loading import load_model, lora_from_config

    data = load_data(config.data)
    model, tok = load_model(ModelSpec.from_config(config.model), lora_from_config(config.lora))
    load_peft_adapter(model, os.path.join(run_dir, "adapter"))
    return choice_accuracy(model, tok, data.target_examples("test"), target_choices(data),
                           sources=data.sources, max_length=int(config.train.max_length))[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/smollm2_bigbench.py:cpu")
    ap.add_argument("--workdir", default="checkpoints/real")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    from jaxgrad.pipeline import run_pipeline
    from jaxgrad.data.sources import load_data

    per_seed, seconds = {}, {}
    for seed in range(args.seeds):
        config = seed_config(args.config, seed)
        workdir = args.workdir if seed == 0 else f"{args.workdir}_seed{seed}"
        if seed:
            prepare_seed_dir(args.workdir, workdir)
        t0 = time.time()
        run_pipeline(config, workdir)
        seconds[seed] = round(time.time() - t0, 1)
        sel = json.load(open(os.path.join(workdir, "selection", "selection.json")))
        data = load_data(config.data)
        n_test = len(data.target_examples("test"))
        runs = {}
        for name in config.pipeline.finetune_runs:
            run_dir = os.path.join(workdir, "finetune", name)
            m = json.load(open(os.path.join(run_dir, "sources.json")))
            metrics = m["metrics"]
            choice = metrics.get("test_choice_acc")
            if choice is None:
                choice = choice_accuracy_of_run(config, run_dir)
            runs[name] = {"sources": m["sources"], "test_loss": metrics["test_loss"],
                          "test_accuracy": metrics["test_acc"],
                          "test_accuracy_ci95": wilson(metrics["test_acc"] * n_test, n_test),
                          "test_choice_accuracy": choice,
                          "test_choice_accuracy_ci95": wilson(choice * n_test, n_test)}
        per_seed[str(seed)] = {"workdir": workdir, "auc": sel["ranking_auc"],
                               "selected": sel["selected"], "ranking": sel["ranking"],
                               "n_test": n_test, "runs": runs}
    summary = summarize(per_seed)
    write(args, per_seed, summary, seconds)


def summarize(per_seed: dict) -> dict:
    """Means over seeds; whether the selection is at least as good as each baseline on every seed."""
    import numpy as np

    names = list(next(iter(per_seed.values()))["runs"])
    out = {}
    for name in names:
        vals = {k: [s["runs"][name][k] for s in per_seed.values()]
                for k in ("test_loss", "test_accuracy", "test_choice_accuracy")}
        out[name] = {f"{k}_mean": float(np.mean(v)) for k, v in vals.items()}
    for key in ("test_accuracy", "test_choice_accuracy"):
        out[f"selection_at_least_every_baseline_{key}"] = all(
            s["runs"]["selection"][key] >= max(r[key] for n, r in s["runs"].items() if n != "selection")
            for s in per_seed.values())
    out["auc_mean"] = float(np.mean([s["auc"] for s in per_seed.values()]))
    return out


def write(args, per_seed: dict, summary: dict, seconds: dict) -> None:
    command = (f"python benchmarks/real_selection.py --config={args.config} "
               f"--workdir={args.workdir} --seeds={args.seeds}")
    lines = [f"### {args.config}, {len(per_seed)} seeds ({datetime.date.today()})", "",
             f"- machine: {cpu_model()}, {os.cpu_count()} cores; command: `{command}`",
             "- seed s varies subset sampling, the projection P, the bootstrap and random "
             "baseline, and the final fine-tunes (data order, adapter init); one meta-training "
             "(seed 0's θ*) serves every seed (CPU budget)",
             f"- pipeline wall time per seed this call (s; 0-ish = reused): {seconds}", "",
             "| seed | run | test loss | accuracy, generated answer [95% CI] | accuracy, most "
             "likely answer [95% CI] | sources |", "|---|---|---|---|---|---|"]
    for seed, s in per_seed.items():
        for name, r in s["runs"].items():
            lo, hi = r["test_accuracy_ci95"]
            clo, chi = r["test_choice_accuracy_ci95"]
            lines.append(f"| {seed} | {name} | {r['test_loss']:.4f} | {r['test_accuracy']:.3f} "
                         f"[{lo:.2f}, {hi:.2f}] | {r['test_choice_accuracy']:.3f} [{clo:.2f}, "
                         f"{chi:.2f}] | {', '.join(r['sources'])} |")
    lines += ["", "| run | mean test loss | mean accuracy (generated) | mean accuracy (most "
              "likely) |", "|---|---|---|---|"]
    for name, v in summary.items():
        if isinstance(v, dict):
            lines.append(f"| {name} | {v['test_loss_mean']:.4f} | {v['test_accuracy_mean']:.3f} | "
                         f"{v['test_choice_accuracy_mean']:.3f} |")
    aucs = ", ".join(f"{s['auc']:.3f}" for s in per_seed.values())
    lines += ["", f"Ranking AUC per seed: {aucs} (mean {summary['auc_mean']:.3f}). Selection at "
              "least as accurate as every baseline on every seed: generated answer "
              f"{summary['selection_at_least_every_baseline_test_accuracy']}, most likely answer "
              f"{summary['selection_at_least_every_baseline_test_choice_accuracy']}."]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        append_section(RESULTS, HEADING, text)
        update_results(JSON_PATH, selection={"command": command, "date": str(datetime.date.today()),
                                             "seeds": per_seed, "summary": summary})


if __name__ == "__main__":
    main()
