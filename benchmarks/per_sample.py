"""Benchmark of jaxgrad.gradients.per_sample: projected per-sample gradients against a plain backward pass
and against two PyTorch implementations; appends the figures to benchmarks/RESULTS.md under
"## Per-sample projected gradients (CPU)".

Run from the repository root::

    .venv/bin/python benchmarks/per_sample.py            # full run, ~2 minutes on 2 cores
    .venv/bin/python benchmarks/per_sample.py --quick    # fewer cases and repeats, prints only

The model is a small random Llama (hidden 128, 4 layers, 4 heads, MLP 256, vocabulary 512) with
LoRA r = 8 on q, k, v (D = 24,576 trainable numbers) and nonzero ``lora_B``, so that every
adapter weight has a nonzero gradient, as at a meta-trained θ*. Batches are random tokens of
length 64, right-padded to lengths 40…64, with the first 16 positions as prompt (no target).
The output function is ``logit_odds`` everywhere; P is Rademacher with k = 1024.

Part 1, overhead of per-sample gradients (batch 32): ``per_sample_projected_grads`` at several
chunk sizes divided by one plain batched forward + backward, ``jit(grad)`` of the batch-mean
output w.r.t. the LoRA parameters. To see where the time goes, each chunk size is also timed in
pieces: the jitted core without the Python wrapper (``nnx.split``, checks); ``vmap(grad)`` over
the chunks with the gradients returned unprojected; the leaf-by-leaf projection of those
gradients (what jaxgrad does) and, for comparison, one projection of the concatenated [chunk, D]
gradients; the plain batched gradient accumulated over the same chunks (chunking alone changes
the speed of a backward pass on a CPU's caches). A variant of the core that projects the
concatenated gradients (not jaxgrad's code, a candidate change) is timed alongside.

Part 2, against PyTorch (the same weights, written with ``save_pretrained`` /
``save_peft_adapter`` and loaded with ``transformers`` + ``peft``), batches of 8 and 32:

* the paper's code: one batched forward, then ``torch.autograd.grad(f_i, lora_params,
  retain_graph=True)`` for each sample, the flattened gradient cast to float64 and multiplied
  by a materialised float64 numpy D×k projection matrix;
* the TRAK approach: ``torch.func.vmap(grad)`` over the samples, then one dense float32 matmul.

Both use P = ``Projector.dense()``, jaxgrad's own matrix, so their projected gradients must equal
jaxgrad's up to float32 rounding; the largest difference is printed and recorded.

Every case is compiled / warmed up twice, then all cases of a part are timed round-robin
(starting each round at a different case) and the median of each is reported, with the process
CPU time (all threads) next to it. Ratios are between medians of the same run. torch runs with
``OMP_WAIT_POLICY=PASSIVE`` (set here unless already set): with spinning OpenMP workers the
torch contenders ran up to 10× slower and erratically on a shared machine.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrad.common.flat import flat_spec
from jaxgrad.models.forward import model_logits
from jaxgrad.models import (LlamaConfig, LoraConfig, apply_lora, build_model, save_peft_adapter,
                            save_pretrained)
from jaxgrad.models.llama import to_hf_config
from jaxgrad.gradients.outputs import get_output_fn
from jaxgrad.gradients.per_sample import _projected_grads, per_sample_projected_grads
from jaxgrad.gradients.projection import Projector
from jaxgrad.models.lora import linear_modules
from jaxgrad.models.peft import PEFT_PREFIX
from common import RESULTS, append_section, cpu_model  # benchmarks/common.py (the script's folder)

# torch's OpenMP workers spin while waiting for work by default; on a machine shared with other
# processes that made the torch contenders up to 10× slower and erratic (a worker spinning while
# the one it waits for is descheduled). Passive waiting is set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HEADING = "## Per-sample projected gradients (CPU)"
OUTPUT_FN = "logit_odds"
EPS = 1e-6  # logit_odds probability clipping, the same in every implementation
PROMPT = 16  # leading positions without a target


# ----------------------------------------------------------------------------------------------
# Model and data
# ----------------------------------------------------------------------------------------------


def make_model(vocab: int, seed: int = 0) -> tuple[nnx.Module, LlamaConfig]:
    """The small Llama with LoRA r=8 on q,k,v and random nonzero ``lora_B``."""
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                      head_dim=32)
    model = build_model(cfg, seed=seed)
    apply_lora(model, LoraConfig(rank=8, alpha=16.0, target_modules=("q_proj", "k_proj", "v_proj"),
                                 seed=seed))
    rng = np.random.default_rng(seed)
    for _, lin in sorted(linear_modules(model).items()):
        if lin.lora_B is not None:
            lin.lora_B[...] = jnp.asarray(0.05 * rng.standard_normal(lin.lora_B.shape), jnp.float32)
    return model, cfg


def make_batch(n: int, length: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """A right-padded decoder batch in :mod:`jaxgrad.data.batching`'s layout (model inputs only)."""
    rng = np.random.default_rng(seed)
    ids_NxL = rng.integers(1, vocab, size=(n, length)).astype(np.int32)
    lengths_N = rng.integers(length * 5 // 8, length + 1, size=n)
    mask_NxL = (np.arange(length)[None, :] < lengths_N[:, None]).astype(np.int32)
    ids_NxL *= mask_NxL  # pad id 0
    targets_NxL = np.concatenate([ids_NxL[:, 1:], np.zeros((n, 1), np.int32)], axis=1)
    tmask_NxL = np.concatenate([mask_NxL[:, 1:], np.zeros((n, 1), np.int32)], 1).astype(np.float32)
    tmask_NxL[:, :PROMPT] = 0.0
    return {"input_ids": ids_NxL, "attention_mask": mask_NxL, "targets": targets_NxL,
            "target_mask": tmask_NxL}


def torch_names(spec_paths) -> list[str]:
    """peft parameter names in jaxgrad's flat order (``flat_spec`` of the LoRA state).

    ``"['model']['layers'][0]['self_attn']['k_proj']['lora_A'].value"`` becomes
    ``"base_model.model.model.layers.0.self_attn.k_proj.lora_A.default.weight"``: peft stores
    ``lora_A`` as [r, in] and ``lora_B`` as [out, r], the same layout as ours, so a flattened
    torch gradient lines up with the rows of P.
    """
    names = []
    for path in spec_paths:
        parts = [a or b for a, b in re.findall(r"\['([^']*)'\]|\[(\d+)\]", path)]
        if not parts or parts[-1] not in ("lora_A", "lora_B"):
            raise ValueError(f"unexpected LoRA state path {path!r}")
        names.append(PEFT_PREFIX + ".".join(parts) + ".default.weight")
    return names


# ----------------------------------------------------------------------------------------------
# JAX contenders
# ----------------------------------------------------------------------------------------------


def jax_functions(model: nnx.Module, projector: Projector) -> dict[str, Callable]:
    """Jitted baseline, profiling and variant functions over the pre-split LoRA parameters.

    Returns a dict of functions, all of ``(params, batch)`` unless said otherwise, ``chunk``
    static:

    * ``params``: the LoRA state (not a function);
    * ``batched_grad``: ``grad`` of the batch-mean output, one forward + backward;
    * ``batched_grad_chunked(params, batch, chunk)``: the same gradient accumulated over chunks
      (``lax.map``), to separate the cost of per-sample gradients from that of the chunking;
    * ``core(params, batch, chunk)``: jaxgrad's jitted function without the Python wrapper;
    * ``vmap_only(params, batch, chunk)``: the per-sample ``(values, grads)``, gradient leaves
      [chunks, chunk, ...] left unprojected;
    * ``project_only(grads)``: projects such a gradient tree leaf by leaf, as jaxgrad does;
    * ``project_concat_only(grads)``: projects it in one call per chunk on the concatenated
      [chunk, D] gradients;
    * ``concat_project(params, batch, chunk)``: ``core`` with one ``project`` call per chunk on
      the concatenated [chunk, D] gradients instead of one call per leaf (a variant to compare,
      same result up to float32 summation order).
    """
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)
    out_fn = get_output_fn(OUTPUT_FN, EPS)
    spec = flat_spec(params)

    def f_batch(p, batch):
        logits = model_logits(nnx.merge(graphdef, p, rest), batch)
        return out_fn(logits, batch["targets"], batch["target_mask"])

    def f_single(p, example):
        return f_batch(p, jax.tree_util.tree_map(lambda x: x[None], example))[0]

    def chunked(batch, chunk):
        n = batch["input_ids"].shape[0]
        return jax.tree_util.tree_map(lambda x: x.reshape((n // chunk, chunk) + x.shape[1:]),
                                      batch)

    batched_grad = jax.jit(jax.grad(lambda p, batch: jnp.mean(f_batch(p, batch))))

    @functools.partial(jax.jit, static_argnames="chunk")
    def batched_grad_chunked(p, batch, chunk):
        n = batch["input_ids"].shape[0]
        grad_fn = jax.grad(lambda p, c: jnp.sum(f_batch(p, c)) / n)
        grads = jax.lax.map(lambda c: grad_fn(p, c), chunked(batch, chunk))
        return jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), grads)

    per_example = jax.vmap(jax.value_and_grad(f_single), in_axes=(None, 0))

    @functools.partial(jax.jit, static_argnames="chunk")
    def vmap_only(p, batch, chunk):
        return jax.lax.map(lambda c: per_example(p, c), chunked(batch, chunk))

    def project_leaves(grads):
        leaves = jax.tree_util.tree_leaves(grads)
        chunk = leaves[0].shape[0]
        feats_CxK = jnp.zeros((chunk, projector.k), jnp.float32)
        for leaf, offset in zip(leaves, spec.offsets):
            feats_CxK = feats_CxK + projector.project(leaf.reshape(chunk, -1), offset=offset)
        return feats_CxK

    def concat_leaves(grads):
        leaves = jax.tree_util.tree_leaves(grads)
        return jnp.concatenate([leaf.reshape(leaves[0].shape[0], -1) for leaf in leaves], axis=1)

    project_only = jax.jit(lambda grads: jax.lax.map(project_leaves, grads))
    project_concat_only = jax.jit(
        lambda grads: jax.lax.map(lambda g: projector.project(concat_leaves(g)), grads))

    @functools.partial(jax.jit, static_argnames="chunk")
    def concat_project(p, batch, chunk):
        def one_chunk(c):
            vals, grads = per_example(p, c)
            return projector.project(concat_leaves(grads)), vals
        return jax.lax.map(one_chunk, chunked(batch, chunk))

    def core(p, batch, chunk):
        return _projected_grads(graphdef, p, rest, batch, projector=projector, output_fn=OUTPUT_FN,
                                eps=EPS, chunk_size=chunk, data_sharding=None)

    return {"params": params, "batched_grad": batched_grad,
            "batched_grad_chunked": batched_grad_chunked, "core": core, "vmap_only": vmap_only,
            "project_only": project_only, "project_concat_only": project_concat_only,
            "concat_project": concat_project}


# ----------------------------------------------------------------------------------------------
# PyTorch contenders
# ----------------------------------------------------------------------------------------------


def load_torch(model: nnx.Module, cfg: LlamaConfig, directory: str,
               attn_implementation: str | None = None):
    """The same weights in torch: ``LlamaForCausalLM`` + the peft adapter (trainable).

    Writes the checkpoint and adapter into ``directory`` unless they are already there.
    """
    import peft
    import transformers

    if not os.path.exists(os.path.join(directory, "config.json")):
        save_pretrained(model, directory, to_hf_config(cfg))
        save_peft_adapter(model, os.path.join(directory, "adapter"))
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    base = transformers.LlamaForCausalLM.from_pretrained(directory, **kw)
    return peft.PeftModel.from_pretrained(base, os.path.join(directory, "adapter"),
                                          is_trainable=True).eval()


def torch_logit_odds(logits_BxLxV, targets_BxL, tmask_BxL, eps: float = EPS):
    """``jaxgrad.gradients.outputs.logit_odds`` in torch: z_gold − logsumexp(z_other), clipped, masked mean."""
    import torch

    z = logits_BxLxV.float()
    gold = torch.gather(z, -1, targets_BxL[..., None])[..., 0]
    is_gold = torch.arange(z.shape[-1]) == targets_BxL[..., None]
    others = torch.logsumexp(z.masked_fill(is_gold, -math.inf), dim=-1)
    bound = math.log((1.0 - eps) / eps)
    vals = torch.clamp(gold - others, -bound, bound)
    return (vals * tmask_BxL).sum(-1) / tmask_BxL.sum(-1).clamp_min(1.0)


def torch_batch(batch: dict):
    import torch

    return {"input_ids": torch.as_tensor(batch["input_ids"], dtype=torch.long),
            "attention_mask": torch.as_tensor(batch["attention_mask"], dtype=torch.long),
            "targets": torch.as_tensor(batch["targets"], dtype=torch.long),
            "target_mask": torch.as_tensor(batch["target_mask"], dtype=torch.float32)}


def torch_loop_fn(pm, names: list[str], proj_DxK_f64: np.ndarray) -> Callable:
    """The paper's approach: one forward, a backward per sample, float64 numpy projection."""
    import torch

    named = dict(pm.named_parameters())
    lora = [named[n] for n in names]

    def run(tb):
        logits = pm(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"]).logits
        f_B = torch_logit_odds(logits, tb["targets"], tb["target_mask"])
        feats_BxK = np.empty((f_B.shape[0], proj_DxK_f64.shape[1]))
        for i in range(f_B.shape[0]):
            grads = torch.autograd.grad(f_B[i], lora, retain_graph=True)
            g_D = torch.cat([g.reshape(-1) for g in grads]).numpy().astype(np.float64)
            feats_BxK[i] = g_D @ proj_DxK_f64
        return feats_BxK, f_B.detach().numpy()

    return run


def torch_vmap_fn(pm, names: list[str], proj_DxK_f32) -> Callable:
    """The TRAK approach: ``torch.func.vmap(grad)`` over samples, then one dense float32 matmul."""
    import torch
    from torch.func import functional_call, grad_and_value, vmap

    params = {n: p.detach() for n, p in pm.named_parameters() if n in set(names)}

    def f_one(p, ids_L, mask_L, targets_L, tmask_L):
        logits = functional_call(pm, p, (), {"input_ids": ids_L[None],
                                             "attention_mask": mask_L[None]}).logits
        return torch_logit_odds(logits, targets_L[None], tmask_L[None])[0]

    per_sample = vmap(grad_and_value(f_one), in_dims=(None, 0, 0, 0, 0))

    def run(tb):
        grads, f_B = per_sample(params, tb["input_ids"], tb["attention_mask"], tb["targets"],
                                tb["target_mask"])
        g_BxD = torch.cat([grads[n].reshape(f_B.shape[0], -1) for n in names], dim=1)
        return (g_BxD @ proj_DxK_f32).numpy(), f_B.numpy()

    return run


# ----------------------------------------------------------------------------------------------
# Timing and reporting
# ----------------------------------------------------------------------------------------------


def time_round_robin(cases: dict[str, Callable], repeats: int, warmup: int = 2) -> dict:
    """Median wall and CPU seconds of each case, cases interleaved.

    Each case is called ``warmup`` times first (compilation, allocator warm-up). Round r starts
    at case r mod n, so no case always runs right after the same other one.
    """
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            c0, t0 = time.process_time(), time.perf_counter()
            cases[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {n: {"wall": statistics.median(wall[n]), "cpu": statistics.median(cpu[n]),
                "best": min(wall[n])} for n in names}


def rel_diff(a, b) -> float:
    """max |a − b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def ms(t: float) -> str:
    return f"{t * 1e3:.1f}"


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="chunk sizes 8 and 32 only, 3 repeats, torch at batch 8 only; "
                             "prints only (implies --no-write)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per part (default 11, 3 with --quick)")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 11)
    chunks = (8, 32) if args.quick else (8, 16, 32)
    torch_sizes = (8,) if args.quick else (8, 32)
    write = not (args.quick or args.no_write)

    import peft
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    n, length = 32, 64
    model, cfg = make_model(args.vocab)
    spec = flat_spec(nnx.state(model, nnx.LoRAParam))
    dim = spec.size
    projector = Projector(seed=0, dim=dim, k=args.k, kind="rademacher")
    batch_np = make_batch(n, length, args.vocab, seed=1)
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    fns = jax_functions(model, projector)
    params = fns["params"]
    print(f"D = {dim}, k = {args.k}, batch {n} x {length}, vocab {args.vocab}; "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads", flush=True)

    # ---- Part 1: per-sample projected gradients vs one batched backward (batch 32) ----
    def run(fn, *a):
        return lambda: jax.block_until_ready(fn(*a))

    grads_by_chunk = {c: jax.block_until_ready(fns["vmap_only"](params, batch, c)[1])
                      for c in chunks}
    ref = per_sample_projected_grads(model, batch, projector, OUTPUT_FN, eps=EPS, chunk_size=8)
    variant_diff = max(rel_diff(fns["concat_project"](params, batch, c)[0].reshape(n, -1),
                                ref.feats) for c in chunks)
    print(f"concatenated-projection variant vs jaxgrad: max rel. diff {variant_diff:.1e}")
    labels = {  # case key -> (row label, chunk)
        "base": ("batched grad: `jit(grad)` of the batch-mean output", "–"),
    }
    cases = {"base": run(fns["batched_grad"], params, batch)}
    for c in chunks:
        kinds = {
            "per_sample": ("`per_sample_projected_grads`", per_sample_projected_grads,
                           (model, batch, projector, OUTPUT_FN), {"eps": EPS, "chunk_size": c}),
            "core": ("its jitted core alone", fns["core"], (params, batch, c), {}),
            "vmap": ("profile: `vmap(grad)` alone (unprojected)", fns["vmap_only"],
                     (params, batch, c), {}),
            "proj": ("profile: leaf-by-leaf projection alone", fns["project_only"],
                     (grads_by_chunk[c],), {}),
            "proj_concat": ("profile: one projection of the concatenated gradients alone",
                            fns["project_concat_only"], (grads_by_chunk[c],), {}),
            "concat": ("variant: core with one `project` of the concatenated gradients",
                       fns["concat_project"], (params, batch, c), {}),
        }
        if c < n:
            kinds["chunked"] = ("batched grad accumulated over chunks (`lax.map`)",
                                fns["batched_grad_chunked"], (params, batch, c), {})
        for kind, (label, fn, a, kw) in kinds.items():
            labels[f"{kind} {c}"] = (label, c)
            cases[f"{kind} {c}"] = functools.partial(
                lambda fn, a, kw: jax.block_until_ready(fn(*a, **kw)), fn, a, kw)
    t0 = time.perf_counter()
    part1 = time_round_robin(cases, repeats)
    print(f"part 1 timed in {time.perf_counter() - t0:.0f} s", flush=True)
    base = part1["base"]
    rows1 = []
    for key, (label, c) in labels.items():
        t = part1[key]
        rows1.append(f"| {label} | {c} | {ms(t['wall'])} | {ms(t['cpu'])} | "
                     f"{t['wall'] / base['wall']:.2f} | {t['best'] / base['best']:.2f} |")
        print(rows1[-1], flush=True)
    best_chunk = min(chunks, key=lambda c: part1[f"per_sample {c}"]["wall"])
    best_ratio = part1[f"per_sample {best_chunk}"]["wall"] / base["wall"]
    concat_chunk = min(chunks, key=lambda c: part1[f"concat {c}"]["wall"])
    concat_ratio = part1[f"concat {concat_chunk}"]["wall"] / base["wall"]

    # ---- Part 2: against PyTorch (same weights, same P) ----
    with tempfile.TemporaryDirectory() as tmp:
        pm = load_torch(model, cfg, tmp)
        # torch.func.vmap cannot trace the SDPA mask's data-dependent shortcut: eager attention.
        pm_eager = load_torch(model, cfg, tmp, attn_implementation="eager")
    names = torch_names(spec.paths)
    proj_DxK = np.asarray(projector.dense(max_entries=dim * args.k))
    proj_f64 = proj_DxK.astype(np.float64)  # the paper's materialised matrix
    proj_f32_t = torch.from_numpy(proj_DxK.copy())
    loop_fn = torch_loop_fn(pm, names, proj_f64)
    vmap_fn = torch_vmap_fn(pm_eager, names, proj_f32_t)

    # Agreement on 8 samples: logits, f and projected gradients.
    small_np = {k: v[:8] for k, v in batch_np.items()}
    small_t = torch_batch(small_np)
    with torch.no_grad():
        logits_t = pm(input_ids=small_t["input_ids"],
                      attention_mask=small_t["attention_mask"]).logits.numpy()
    logits_j = np.asarray(model(jnp.asarray(small_np["input_ids"]),
                                jnp.asarray(small_np["attention_mask"])))
    ours = per_sample_projected_grads(model, small_np, projector, OUTPUT_FN, eps=EPS, chunk_size=8)
    feats_loop, f_loop = loop_fn(small_t)
    feats_vmap, f_vmap = vmap_fn(small_t)
    agree = {
        "logits": rel_diff(logits_j, logits_t),
        "f (loop)": rel_diff(ours.f, f_loop),
        "feats vs loop (float64 P)": rel_diff(ours.feats, feats_loop),
        "feats vs vmap (float32 P)": rel_diff(ours.feats, feats_vmap),
    }
    print("agreement, max |jaxgrad - torch| / max |torch|: "
          + "; ".join(f"{k} {v:.1e}" for k, v in agree.items()), flush=True)
    if max(agree.values()) > 1e-3:
        raise SystemExit(f"jaxgrad and torch disagree: {agree}")

    rows2, speedups = [], {}
    for b in torch_sizes:
        sub_np = {k: v[:b] for k, v in batch_np.items()}
        sub_j = {k: jnp.asarray(v) for k, v in sub_np.items()}
        sub_t = torch_batch(sub_np)
        chunk = min(best_chunk, b)
        cases = {
            "jaxgrad": lambda: jax.block_until_ready(per_sample_projected_grads(
                model, sub_j, projector, OUTPUT_FN, eps=EPS, chunk_size=chunk)),
            "variant: concatenated projection": lambda: jax.block_until_ready(
                fns["concat_project"](params, sub_j, min(concat_chunk, b))),
            "torch loop + float64 numpy P": lambda: loop_fn(sub_t),
            "torch.func vmap(grad) + float32 P": lambda: vmap_fn(sub_t),
        }
        t0 = time.perf_counter()
        res = time_round_robin(cases, max(3, repeats // 2), warmup=1)
        print(f"part 2, batch {b}, timed in {time.perf_counter() - t0:.0f} s", flush=True)
        ours_t = res["jaxgrad"]["wall"]
        for name, t in res.items():
            speedups[(b, name)] = t["wall"] / ours_t
            label = {"jaxgrad": f"jaxgrad (chunk {chunk})",
                     "variant: concatenated projection":
                         f"variant: concatenated projection (chunk {min(concat_chunk, b)})",
                     }.get(name, name)
            rows2.append(f"| {b} | {label} | {ms(t['wall'])} | {ms(t['cpu'])} | "
                         f"{b / t['wall']:.0f} | {t['wall'] / ours_t:.1f}× | "
                         f"{t['best'] / res['jaxgrad']['best']:.1f}× |")
            print(rows2[-1], flush=True)

    total = time.perf_counter() - t_start
    load_end = os.getloadavg()[0]
    command = " ".join([os.path.basename(sys.executable)] + sys.argv)
    targets = [f"per_sample / batched grad at the best chunk ({best_chunk}): {best_ratio:.2f} "
               f"(target ≤ 1.1: {'met' if best_ratio <= 1.1 else 'missed'}; the concatenated-"
               f"projection variant: {concat_ratio:.2f} at chunk {concat_chunk})"]
    for b in torch_sizes:
        loop_x = speedups[(b, "torch loop + float64 numpy P")]
        vmap_x = speedups[(b, "torch.func vmap(grad) + float32 P")]
        var = speedups[(b, "variant: concatenated projection")]
        line = f"batch {b}: {loop_x:.1f}× the torch loop, {vmap_x:.1f}× torch.func vmap"
        if b == 8:
            line += (f" (targets ≥ 10×: {'met' if loop_x >= 10 else 'missed'}; ≥ 1.5×: "
                     f"{'met' if vmap_x >= 1.5 else 'missed'})")
        line += f"; the variant: {loop_x / var:.1f}× and {vmap_x / var:.1f}×"
        targets.append(line)
    print("\n".join(targets))
    block = "\n".join([
        f"### {datetime.date.today().isoformat()} — {cpu_model()}, {os.cpu_count()} cores",
        "",
        f"- command: `{command}` ({total:.0f} s in all); 1-minute load average {load_start:.1f} "
        f"at the start, {load_end:.1f} at the end (shared machine)",
        f"- jax {jax.__version__} (cpu, XLA path of the projection), flax {flax.__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY')}), transformers "
        f"{transformers.__version__}, peft {peft.__version__}",
        f"- model: Llama, hidden 128, 4 layers, 4 heads, MLP 256, vocabulary {args.vocab}, "
        f"LoRA r=8 on q,k,v (D = {dim:,}); batch of random tokens, length {length} "
        f"(right-padded, lengths 40–64, first {PROMPT} positions prompt); output function "
        f"`{OUTPUT_FN}`; P Rademacher, k = {args.k}",
        f"- medians of {repeats} rounds (part 1) and {max(3, repeats // 2)} rounds (part 2) "
        "after warm-up, cases interleaved round-robin; CPU ms = process CPU time, all threads",
        "",
        f"Part 1: batch {n}; ratio = time / time of the first row (one batched forward + "
        "backward w.r.t. the LoRA parameters). Profile rows split jaxgrad's work into its two "
        "halves; the variant row is not jaxgrad's code (see the note below the table). The "
        f"variant's projected gradients equal jaxgrad's to {variant_diff:.0e} (max rel. diff).",
        "",
        "| what | chunk | ms | CPU ms | ratio (medians) | ratio (best of each) |",
        "|---|---|---|---|---|---|",
        *rows1,
        "",
        f"Note on the projection: every LoRA leaf here has at most {max(spec.sizes):,} "
        f"entries (`Projector.block_d` = {projector.block_d:,}), so `project`'s loop over row "
        "blocks has a single trip for each leaf; XLA removes such loops, and the tiles of P (one "
        "per leaf) become constant expressions independent of the gradients, which it "
        "schedules ahead of the matmuls: the whole D×k P "
        f"({dim * args.k * 4 / 2**20:.0f} MiB in float32) is materialised before the first "
        "product and the projection becomes memory-bound. One `project` call on the "
        "concatenated [chunk, D] gradients keeps tile generation inside the loop (compare the "
        "profile rows 'leaf-by-leaf projection alone' and 'one projection of the concatenated "
        "gradients alone').",
        "",
        "Part 2: samples/s against PyTorch on the same weights (`transformers` "
        "`LlamaForCausalLM` + `peft` LoRA) and the same P (`Projector.dense()`). "
        "Agreement with jaxgrad on 8 samples, max |jaxgrad − torch| / max |torch|: "
        + "; ".join(f"{k} {v:.1e}" for k, v in agree.items()) + ".",
        "",
        "| batch | implementation | ms | CPU ms | samples/s | jaxgrad speed-up (medians) | "
        "(best of each) |",
        "|---|---|---|---|---|---|---|",
        *rows2,
        "",
        "Targets: " + "; ".join(targets) + ".",
        "",
    ])
    print(block)
    if write:
        append_section(RESULTS, HEADING, block)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
