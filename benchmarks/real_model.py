"""Per-sample projected gradients on the real model (SmolLM2-135M, BIG-bench text) against one
batched forward + backward of the same batch; appends to benchmarks/RESULTS.md under
"## Real model: per-sample projected gradients (CPU)" and writes
benchmarks/results/real_model.json.

Run from the repository root after ``make real`` (or ``scripts/prepare_real.py``)::

    .venv/bin/python benchmarks/real_model.py                 # ~3 minutes on 2 cores
    .venv/bin/python benchmarks/real_model.py --workdir=checkpoints/real   # at θ* of that run

The model, adapters, data and settings are ``configs/smollm2_bigbench.py:cpu``'s: SmolLM2-135M
(4-bit GGUF weights made float32), LoRA r = 8 on q, k, v, ``token_ce`` outputs, Rademacher P with
the config's k, ``gradients.chunk_size``, batches of ``gradients.batch_size`` real training
examples (the first batch of the training split, in the gradient stage's order and bucketed
length). With ``--workdir`` the adapters are θ* of that run (``lora_B`` nonzero, as in the
gradient stage); otherwise ``lora_B`` is filled with small random values so that every adapter
weight has a nonzero gradient.

Contenders, both jitted, both over the LoRA parameters only, with the frozen weights passed as
arguments (not baked into the program as constants):

* ``per_sample``: :func:`jaxgrad.gradients.per_sample.per_sample_projected_grads`: f_i and x_i = Pᵀ∇f_i
  for every example of the batch;
* ``batched``: ``jax.grad`` of the batch-mean output: one forward + backward, the cost of a
  training step's gradient without the optimizer.

Each is called once to compile (the compile + first-run time is recorded: a user waits for it),
then both are timed round-robin ``--repeats`` times; medians are reported and the ratio is
between medians of this run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common import RESULTS, append_section, cpu_model  # benchmarks/common.py

HEADING = "## Real model: per-sample projected gradients (CPU)"
JSON_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "real_model.json")


def build(config, workdir: str | None):
    from jaxgrad.data.batching import collate
    from jaxgrad.models.forward import encode_for_model
    from jaxgrad.models.lora import linear_modules
    from jaxgrad.gradients.projection import Projector
    from jaxgrad.config import ModelSpec
    from jaxgrad.data.sources import load_data
    from jaxgrad.models.loading import load_model, lora_from_config

    model, tokenizer = load_model(ModelSpec.from_config(config.model),
                                  lora_from_config(config.lora))
    if workdir:
        from jaxgrad.train.checkpoint import restore_params

        restore_params(model, os.path.join(workdir, "meta_train", "ckpt"), "latest")
    else:
        rng = np.random.default_rng(0)
        for _, lin in sorted(linear_modules(model).items()):
            if lin.lora_B is not None:
                lin.lora_B[...] = jnp.asarray(0.01 * rng.standard_normal(lin.lora_B.shape),
                                              jnp.float32)
    data = load_data(config.data)
    examples = data.examples("train")
    g = config.gradients
    encoded, arch = encode_for_model(examples, tokenizer, model, sources=data.sources)
    batch = collate(encoded, list(range(g.batch_size)), max_length=config.train.max_length,
                    arch=arch, batch_size=g.batch_size)
    dim = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.LoRAParam)))
    projector = Projector(seed=g.projection_seed, dim=dim, k=g.projection_dim,
                          kind=g.projection_kind)
    return model, batch, projector, dim


def contenders(model, batch, projector, config):
    from jaxgrad.gradients.outputs import get_output_fn
    from jaxgrad.gradients.per_sample import per_sample_projected_grads
    from jaxgrad.models.forward import MODEL_INPUTS, model_logits

    g = config.gradients
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)
    out_fn = get_output_fn(g.output_fn, g.eps)
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}

    @jax.jit
    def batched_grad(p, r, b):
        def mean_output(p):
            logits = model_logits(nnx.merge(graphdef, p, r), b)
            return jnp.mean(out_fn(logits, b["targets"], b["target_mask"]))
        return jax.grad(mean_output)(p)

    def per_sample():
        return per_sample_projected_grads(model, inputs, projector, g.output_fn, eps=g.eps,
                                          chunk_size=g.chunk_size)

    return {"per_sample": per_sample, "batched": lambda: batched_grad(params, rest, inputs)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/smollm2_bigbench.py:cpu")
    parser.add_argument("--workdir", default="", help="use θ* of this pipeline run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.getcwd())
    from ml_collections import config_flags  # noqa: F401  (config files import ml_collections)
    import importlib.util

    path, _, variant = args.config.partition(":")
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant or None)

    t0 = time.perf_counter()
    model, batch, projector, dim = build(config, args.workdir)
    load_s = time.perf_counter() - t0
    fns = contenders(model, batch, projector, config)
    first = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        jax.block_until_ready(fn())
        first[name] = time.perf_counter() - t
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            jax.block_until_ready(fns[name]())
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in times.items()}
    n, length = batch["input_ids"].shape
    tokens = int(batch["attention_mask"].sum())
    result = {
        "date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()} x {cpu_model()}",
        "command": "benchmarks/real_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": config.model.name_or_path, "quantisation": "Q4_1 GGUF dequantised to float32",
        "lora": f"r={config.lora.rank} on {config.lora.target_modules}", "D": int(dim),
        "k": int(projector.k), "batch": int(n), "bucket_length": int(length),
        "real_tokens": tokens, "chunk_size": int(config.gradients.chunk_size),
        "output_fn": config.gradients.output_fn, "theta_star": bool(args.workdir),
        "load_s": round(load_s, 2),
        "compile_and_first_s": {k: round(v, 2) for k, v in first.items()},
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "per_sample_over_batched": round(med["per_sample"] / med["batched"], 3),
        "samples_per_s": round(n / med["per_sample"], 2),
    }
    lines = [
        "",
        f"{result['date']}, {result['machine']}, jax {jax.__version__}: `{result['command']}`",
        "",
        f"SmolLM2-135M-Instruct ({result['quantisation']}), LoRA {result['lora']} "
        f"(D = {dim:,}), k = {projector.k}, `{result['output_fn']}`, batch of {n} real "
        f"BIG-bench training examples ({tokens} tokens, bucket length {length}), chunk "
        f"{result['chunk_size']}, adapters {'θ* of ' + args.workdir if args.workdir else 'random (B ≠ 0)'}.",
        "",
        "| contender | compile + first call (s) | median (s) | samples/s |",
        "|---|---|---|---|",
        *(f"| {k} | {first[k]:.1f} | {med[k]:.2f} | {n / med[k]:.2f} |" for k in names),
        "",
        f"Per-sample projected gradients take **{result['per_sample_over_batched']:.2f}×** the "
        f"time of one batched forward + backward of the same batch (medians of {args.repeats}, "
        "round-robin, this run).",
    ]
    print("\n".join(lines))
    if not args.no_write:
        append_section(RESULTS, HEADING, "\n".join(lines))
        os.makedirs(os.path.dirname(JSON_PATH), exist_ok=True)
        with open(JSON_PATH, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
