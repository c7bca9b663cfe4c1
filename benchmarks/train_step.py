r"""The demo model's training step on CPU: jaxgrad's ``Linear`` (a 2-D ``[N, in]`` contraction)
against the N-D einsum form it replaced, measured in one run.

  python benchmarks/train_step.py [--config=configs/demo.py] [--steps=200] [--batch-sizes=32,16]

The model is the config's from-scratch Llama with its LoRA targets (configs/demo.py: hidden 64,
2 layers, rank-16 adapters on every linear layer and the LM head), random tokens of
``train.max_length``, one jitted ``jaxgrad.train.step.train_step`` (AdamW, the config's learning rate)
with donated state, as ``run_training`` calls it. Per batch size and form: the first call
(tracing + compilation + one step) and the median over 5 blocks of ``--steps // 5`` steps
(wall time per step, ``block_until_ready`` at each block's end). The einsum form is
``Linear.__call__`` as it was before 2026-11-30 (``"...i,oi->...o"`` on ``[B, L, in]``; LoRA
``"...i,ri->...r"`` then ``"...r,or->...o"``), patched in for its measurements only; the two
forms' losses after the same steps are compared (equal up to float rounding).

Appends "## Training step (CPU, demo model)" to benchmarks/RESULTS.md and writes
benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)

from common import RESULTS, append_section, cpu_model, load_config, update_results  # noqa: E402

HEADING = "## Training step (CPU, demo model)"
JSON_PATH = os.path.join(ROOT, "benchmarks", "results", "train_step.json")


def _einsum_call(self, x, dropout_rng=None):
    """``Linear.__call__`` before 2026-11-30: N-D einsums (no dropout: the demo has none)."""
    import jax.numpy as jnp

    x = x.astype(self.dtype)
    w = self.weight[...].astype(self.dtype)
    y = jnp.einsum("...i,io->...o" if self.transposed else "...i,oi->...o", x, w)
    if self.bias is not None:
        y = y + self.bias[...].astype(self.dtype)
    if self.lora_A is not None:
        a = self.lora_A[...].astype(self.dtype)
        b = self.lora_B[...].astype(self.dtype)
        lora = jnp.einsum("...r,or->...o", jnp.einsum("...i,ri->...r", x, a), b)
        y = y + (self.lora_scaling * lora).astype(y.dtype)
    return y


def measure(config, batch_size: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxgrad.config import TrainConfig
    from jaxgrad.models import llama
    from jaxgrad.models.lora import LoraConfig, apply_lora, split_trainable
    from jaxgrad.train.optim import make_optimizer
    from jaxgrad.train.step import train_step

    scratch = dict(config.model.scratch)
    length = int(config.train.max_length)
    cfg = llama.LlamaConfig(**{**scratch, "max_position_embeddings": length})
    model = llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    model = apply_lora(model, LoraConfig(rank=int(config.lora.rank), alpha=float(config.lora.alpha),
                                         target_modules=tuple(config.lora.target_modules.split(","))))
    rng = np.random.default_rng(0)
    vocab = int(scratch["vocab_size"])
    batch = {"input_ids": rng.integers(0, vocab, (batch_size, length)).astype(np.int32),
             "attention_mask": np.ones((batch_size, length), np.int32),
             "targets": rng.integers(0, vocab, (batch_size, length)).astype(np.int32),
             "target_mask": np.ones((batch_size, length), np.int32),
             "valid": np.ones((batch_size,), np.int32)}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    tcfg = TrainConfig(learning_rate=float(config.train.learning_rate),
                       batch_size=batch_size, schedule="cosine")
    tx = make_optimizer(tcfg, steps + 1)
    graphdef, trainable, frozen = split_trainable(model)
    opt = tx.init(trainable)
    step = jax.jit(functools.partial(train_step, graphdef, tx=tx), donate_argnums=(0, 2))
    t = time.perf_counter()
    trainable, opt, m = step(trainable, frozen, opt, batch, None)
    jax.block_until_ready(m)
    first = time.perf_counter() - t
    block = max(steps // 5, 1)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(block):
            trainable, opt, m = step(trainable, frozen, opt, batch, None)
        jax.block_until_ready(m)
        times.append((time.perf_counter() - t) / block)
    return {"first_call_s": round(first, 3), "median_step_ms": round(statistics.median(times) * 1e3, 2),
            "loss_after": float(m["loss"]), "steps": 1 + 5 * block}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo.py")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-sizes", default="32,16")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)

    from jaxgrad.models import layers

    config = load_config(args.config)
    rows = []
    current = layers.Linear.__call__
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        row = {"batch_size": b}
        for name, fn in (("einsum", _einsum_call), ("dot_2d", current)):
            layers.Linear.__call__ = fn
            try:
                row[name] = measure(config, b, args.steps)
            finally:
                layers.Linear.__call__ = current
            print(f"batch {b}, {name}: {row[name]}", flush=True)
        row["speedup"] = round(row["einsum"]["median_step_ms"] / row["dot_2d"]["median_step_ms"], 2)
        row["loss_rel_diff"] = abs(row["einsum"]["loss_after"] - row["dot_2d"]["loss_after"]) / abs(
            row["einsum"]["loss_after"])
        rows.append(row)

    date = datetime.date.today().isoformat()
    machine = f"{os.cpu_count()} x {cpu_model()}"
    command = "python benchmarks/train_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"### {date} — {machine}", "", f"`{command.strip()}`: {args.config}'s model, "
             f"max length {int(config.train.max_length)}, one jitted train_step (LoRA, AdamW); "
             "median over 5 blocks; both forms in this one run.", "",
             "| batch | einsum: first call (s) | einsum: ms/step | 2-D dot: first call (s) "
             "| 2-D dot: ms/step | speed-up | loss rel. diff after the same steps |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch_size']} | {r['einsum']['first_call_s']:.2f} "
                     f"| {r['einsum']['median_step_ms']:.1f} | {r['dot_2d']['first_call_s']:.2f} "
                     f"| {r['dot_2d']['median_step_ms']:.1f} | {r['speedup']:.2f}× "
                     f"| {r['loss_rel_diff']:.1e} |")
    block = "\n".join(lines) + "\n"
    print(block)
    if not args.no_write:
        append_section(RESULTS, HEADING, block)
        update_results(JSON_PATH, date=date, machine=machine, command=command.strip(),
                       config=args.config, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
