"""One prepared GPU check (issue 14): the Pallas projection against XLA, projected per-sample
gradients and a batched backward of a 1.1B Llama, and 100k surrogate fits, in one run of at most
~8 minutes on one H200.

Run from the repository root::

    python benchmarks/device_check.py                 # the GPU run: JSON + RESULTS.md section
    python benchmarks/device_check.py --smoke --out /tmp/x.json   # toy sizes on CPU, < 60 s
    python benchmarks/device_check.py --parts projection,surrogate  # a subset of the parts

The four parts (each in its own try/except: a failure is recorded as an ``error`` string and the
other parts still run; the JSON at ``--out`` is rewritten after every part, so a run killed by a
timeout still leaves the parts it finished):

1. ``projection``: ``Projector(backend="xla")`` against ``Projector(backend="pallas")`` on the
   same N×D gradients (N = the per-sample chunk, D = the LoRA size of part 2, k = 8192,
   Rademacher), float32 and bfloat16 inputs. Agreement: ``max|pallas - xla| <= PROJ_RTOL ·
   max|xla|`` (PROJ_RTOL = 1e-4; the two differ only in the order of float32 summation, measured
   ~1e-6 relative). A second check uses integer-valued g in [-2, 2]: every partial sum is then
   an integer below 2^24, so the two paths must agree bit for bit (``int_bit_equal``). On CPU the
   Pallas path runs in interpret mode (``interpret: true`` in the JSON).
2. ``per_sample``: ``jaxgrad.gradients.per_sample.per_sample_projected_grads`` (``logit_odds``,
   chunked ``vmap(grad)`` + projection, projector backend "auto": Pallas on GPU) on a randomly
   initialised Llama of TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads,
   MLP 5632, vocabulary 32000, RoPE θ 10000, RMS eps 1e-5, untied head), bfloat16 parameters
   and compute, LoRA r = 16 (alpha 32) on q_proj, k_proj, v_proj with float32 adapters (jaxgrad's
   rule) and small random ``lora_B`` (so that every adapter weight has a nonzero gradient, as at a
   meta-trained θ*), random tokens, T = 256, the second half of each sequence as target tokens.
3. ``batched``: the ceiling: one ``jit(value_and_grad)`` of the ordinary token-mean
   cross-entropy of the whole batch (``jaxgrad.train.losses.batch_loss``) w.r.t. the LoRA parameters,
   same model and batch size.
4. ``surrogate``: ``jaxgrad.estimate.surrogate.fit_subsets`` (gradex objective, C = 1e-4, the paper's) on
   N = 4096 samples × k = 2048 features for 100,000 random masks that each hold every sample
   with probability 1/2; ``chunk_size`` subsets per jitted solve. The features are a shared mean
   direction plus standard-normal noise (projected gradients share a mean direction), for which
   "auto" picks the diagonal preconditioner; iterations (mean / max) and the converged fraction
   are recorded with the time.

Timing: every figure is a ``jax.block_until_ready`` wall time. ``first_call_s`` is the first call
(tracing + compilation + one run); ``median_s`` the median of the following calls (``repeats``,
fewer when a part's time budget runs out); ``compile_s`` = first_call_s - median_s, an estimate
of compilation alone. For the surrogate the compile figure comes from a call on one chunk of
subsets (first minus second call on one chunk), and subsets/s from whole 100k-subset calls
(masks passed as a host numpy array, transfers included).

FLOPs counted per sample (``flops_per_sample`` in the JSON), T tokens, L layers, hidden d,
r the LoRA rank:

* forward: ``2·T·N_matmul`` with ``N_matmul`` the weights of every matmul (q, k, v, o, gate, up,
  down in every layer and the LM head; the embedding is a lookup and the norms are not
  counted), plus attention ``4·L·T²·d`` (QKᵀ and PV over the full T×T square: jaxgrad computes
  the masked square, so causality is *not* halved), plus the LoRA branches
  ``2·T·r·(in + out)`` per adapted module;
* backward: the activation gradients only, ``2·T·N_matmul`` (one matmul per forward matmul),
  attention ``8·L·T²·d`` (dS and dV, then dQ and dK), and the LoRA branches twice (activation
  gradients plus the weight gradients of A and B). The weight-gradient matmuls of the frozen
  base (the other ``2·T·N_matmul`` of a full fine-tuning step) are not needed with LoRA and
  not counted: a step here is ≈ 2× a forward, not 3×;
* per-sample gradients add the projection ``2·D·k`` (D the LoRA parameter count); the integer
  hash that generates P on the fly is not counted as FLOPs.

MFU = counted FLOPs × samples/s / peak, with the peak the chip's dense bfloat16 tensor-core rate
(``PEAK_BF16_TFLOPS``; ``--peak-tflops`` overrides it, and MFU is null on a device not in the
table, e.g. a CPU). The per-sample projection runs in float32 (the adapters' gradients are
float32), which is not a bf16 tensor-core operation; it is still counted against the bf16 peak.

The script imports jax, flax, numpy and jaxgrad's core modules only: not ``datasets`` nor
``ml_collections`` (nor ``jaxgrad.train.checkpoint``, which pulls in orbax); the JSON lists which optional
packages ended up imported (``imported_optional``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _p in (REPO, HERE):  # jaxgrad from this checkout, and benchmarks/common.py
    if _p not in sys.path:
        sys.path.insert(0, _p)

import jax
import jax.numpy as jnp
import numpy as np
from common import append_section, cpu_model, update_results

DEFAULT_OUT = os.path.join(HERE, "results", "device_check.json")
HEADING = "## Device check (GPU)"
PARTS = ("projection", "per_sample", "batched", "surrogate")
OPTIONAL_MODULES = ("datasets", "ml_collections", "transformers", "torch", "orbax")

# Dense (no structured sparsity) bfloat16 tensor-core peaks in TFLOP/s, matched as substrings of
# jax's device_kind, most specific first. Sources: NVIDIA's product datasheets, which quote the
# sparse rate ("with sparsity"), twice the dense one:
#   H200 SXM: "BF16 Tensor Core 1,979 TFLOPS*" (*with sparsity) -> 989 dense
#     (NVIDIA H200 Tensor Core GPU datasheet, nvidia.com/en-us/data-center/h200/);
#   H100 SXM: 1,979 sparse -> 989 dense; H100 PCIe: 1,513 sparse -> 756 dense
#     (NVIDIA H100 Tensor Core GPU datasheet);
#   A100: 312 dense (NVIDIA A100 Tensor Core GPU datasheet).
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0))
PEAK_SOURCE = ("NVIDIA datasheets, dense BF16 tensor-core rate (half the 'with sparsity' "
               "figure): H200 989, H100 SXM 989, H100 PCIe 756, A100 312 TFLOP/s")

PROJ_RTOL = 1e-4  # max|pallas - xla| <= PROJ_RTOL · max|xla|

# TinyLlama-1.1B's shape (TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T config.json).
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                 num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 head_dim=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                 max_position_embeddings=2048, tie_word_embeddings=False)
TOY_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                 rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=False)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj")

SIZES = {
    "full": dict(
        llama=TINYLLAMA, dtype="bfloat16", seq_len=256, rank=16, alpha=32.0, k=8192,
        n_samples=64, chunk_size=16, repeats=3, part_budget_s=60.0,
        proj_n=16, proj_repeats=5,
        sur_n=4096, sur_k=2048, sur_subsets=100_000, sur_chunk=4096, sur_repeats=3,
        sur_budget_s=90.0),
    "smoke": dict(
        llama=TOY_LLAMA, dtype="bfloat16", seq_len=16, rank=8, alpha=16.0, k=64,
        n_samples=8, chunk_size=4, repeats=2, part_budget_s=10.0,
        proj_n=8, proj_repeats=2,
        sur_n=256, sur_k=32, sur_subsets=1000, sur_chunk=250, sur_repeats=2,
        sur_budget_s=10.0),
}

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[device_check {time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Timing and FLOP counting


def time_calls(fn, repeats: int, budget_s: float) -> tuple[object, dict]:
    """``(result of the first call, timings)``: the first call (compile + run), then up to
    ``repeats`` further calls, stopping early once their total passes ``budget_s``."""
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t
    steady = []
    while len(steady) < repeats and (not steady or sum(steady) < budget_s):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        steady.append(time.perf_counter() - t)
    med = statistics.median(steady)
    return out, {"first_call_s": round(first, 4), "median_s": round(med, 5),
                 "compile_s": round(max(first - med, 0.0), 3),
                 "steady_s": [round(s, 5) for s in steady]}


def lora_io(llama: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of every linear layer of one decoder layer."""
    h, f = llama["hidden_size"], llama["intermediate_size"]
    q, kv = llama["num_attention_heads"] * llama["head_dim"], \
        llama["num_key_value_heads"] * llama["head_dim"]
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}


def lora_dim(llama: dict, rank: int, targets=LORA_TARGETS) -> int:
    """D: LoRA numbers (A [r, in] and B [out, r] per adapted module and layer)."""
    io = lora_io(llama)
    return llama["num_hidden_layers"] * rank * sum(sum(io[t]) for t in targets)


def flops_per_sample(llama: dict, seq_len: int, rank: int, k: int,
                     targets=LORA_TARGETS) -> dict:
    """The FLOP count of the module docstring, per sample (one sequence of ``seq_len``)."""
    T, L, h, V = seq_len, llama["num_hidden_layers"], llama["hidden_size"], llama["vocab_size"]
    io = lora_io(llama)
    n_matmul = L * sum(i * o for i, o in io.values()) + h * V  # + LM head; embedding: lookup
    n_params = n_matmul + V * h + L * 2 * h + h  # + embedding and the RMSNorm weights
    d_attn = llama["num_attention_heads"] * llama["head_dim"]
    base = 2 * T * n_matmul
    attention = 4 * L * T * T * d_attn
    lora = 2 * T * rank * L * sum(sum(io[t]) for t in targets)
    forward = base + attention + lora
    backward = base + 2 * attention + 2 * lora  # activation grads; no base weight grads
    D = lora_dim(llama, rank, targets)
    projection = 2 * D * k
    return {"n_params": n_params, "n_matmul_params": n_matmul, "lora_dim": D,
            "forward": forward, "backward": backward, "forward_base_matmuls": base,
            "forward_attention": attention, "forward_lora": lora, "projection": projection,
            "batched_step": forward + backward,
            "per_sample_step": forward + backward + projection}


def peak_flops(device_kind: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_kind.lower():
            return tflops * 1e12
    return None


def rates(samples: int, seconds: float, flops_each: int, peak: float | None) -> dict:
    sps = samples / seconds
    achieved = sps * flops_each
    return {"samples_per_s": round(sps, 3), "tflops": round(achieved / 1e12, 3),
            "mfu": None if peak is None else round(achieved / peak, 4)}


# ---------------------------------------------------------------------------------------------
# The model (shared by parts 2 and 3)


def build_lora_llama(sz: dict):
    """A random Llama of ``sz["llama"]``'s shape with LoRA adapters and random ``lora_B``."""
    from jaxgrad.models import LlamaConfig, LoraConfig, apply_lora, build_model
    from jaxgrad.models.lora import linear_modules

    cfg = LlamaConfig(**sz["llama"], dtype=sz["dtype"], param_dtype=sz["dtype"])
    model = build_model(cfg, seed=0)
    apply_lora(model, LoraConfig(rank=sz["rank"], alpha=sz["alpha"],
                                 target_modules=LORA_TARGETS, seed=0))
    key = jax.random.key(1)
    for i, lin in enumerate(linear_modules(model).values()):
        if lin.lora_B is not None:
            b = 0.01 * jax.random.normal(jax.random.fold_in(key, i), lin.lora_B.shape)
            lin.lora_B[...] = b.astype(lin.lora_B[...].dtype)
    return model


def random_batch(sz: dict) -> dict:
    n, T, V = sz["n_samples"], sz["seq_len"], sz["llama"]["vocab_size"]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (n, T + 1), dtype=np.int32)
    target_mask = np.zeros((n, T), np.float32)
    target_mask[:, T // 2:] = 1.0  # second half: the completion
    return {"input_ids": jnp.asarray(ids[:, :T]), "attention_mask": jnp.ones((n, T), jnp.int32),
            "targets": jnp.asarray(ids[:, 1:]), "target_mask": jnp.asarray(target_mask),
            "valid": jnp.ones((n,), jnp.float32)}


_MODEL: dict = {}


def shared_model(sz: dict):
    """(model, batch, build seconds), built once for parts 2 and 3."""
    from flax import nnx

    if "model" not in _MODEL:
        log(f"building the random Llama ({sz['llama']['num_hidden_layers']} layers, hidden "
            f"{sz['llama']['hidden_size']}, {sz['dtype']}) with LoRA r={sz['rank']}")
        t = time.perf_counter()
        model = build_lora_llama(sz)
        jax.block_until_ready(jax.tree_util.tree_leaves(nnx.state(model)))
        _MODEL.update(model=model, batch=random_batch(sz), build_s=time.perf_counter() - t)
        log(f"built in {_MODEL['build_s']:.1f} s")
    return _MODEL["model"], _MODEL["batch"], _MODEL["build_s"]


def model_info(sz: dict, peak: float | None) -> dict:
    fl = flops_per_sample(sz["llama"], sz["seq_len"], sz["rank"], sz["k"])
    return {"llama": sz["llama"], "dtype": sz["dtype"], "lora": f"r={sz['rank']} alpha="
            f"{sz['alpha']} on {','.join(LORA_TARGETS)} (float32 adapters)",
            "seq_len": sz["seq_len"], "n_samples": sz["n_samples"], "k": sz["k"],
            "flops_per_sample": fl, "peak_flops": peak}


# ---------------------------------------------------------------------------------------------
# The four parts


def part_projection(sz: dict, peak: float | None) -> dict:
    from jaxgrad.gradients import pallas
    from jaxgrad.gradients.projection import Projector

    n, k = sz["proj_n"], sz["k"]
    dim = lora_dim(sz["llama"], sz["rank"])
    res = {"n": n, "dim": dim, "k": k, "kind": "rademacher", "rtol": PROJ_RTOL,
           "interpret": bool(pallas._interpret()), "cases": {}}
    projs = {b: Projector(seed=14, dim=dim, k=k, backend=b) for b in ("xla", "pallas")}
    flops = 2 * n * dim * k
    key = jax.random.key(0)
    for dtype in ("float32", "bfloat16"):
        log(f"projection: N={n}, D={dim:,}, k={k}, {dtype}")
        g = jax.random.normal(key, (n, dim), jnp.float32).astype(dtype)
        case, outs = {}, {}
        for backend, proj in projs.items():
            outs[backend], t = time_calls(lambda proj=proj, g=g: proj.project(g),
                                          sz["proj_repeats"], sz["part_budget_s"] / 4)
            t["tflops"] = round(flops / t["median_s"] / 1e12, 3)
            case[backend] = t
            log(f"  {backend}: first {t['first_call_s']:.3f} s, median {t['median_s']:.5f} s")
        x, p = np.asarray(outs["xla"]), np.asarray(outs["pallas"])
        diff, ref = float(np.max(np.abs(p - x))), float(np.max(np.abs(x)))
        case.update(max_abs_diff=diff, max_abs_ref=ref, rel_diff=diff / max(ref, 1e-30),
                    tolerance=PROJ_RTOL * ref, agree=bool(np.isfinite(diff)
                                                          and diff <= PROJ_RTOL * ref),
                    pallas_speedup=round(case["xla"]["median_s"] / case["pallas"]["median_s"],
                                         3))
        # Integer-valued g: every partial sum is exact, so the paths must agree bit for bit.
        gi = jax.random.randint(jax.random.fold_in(key, 1), (n, dim), -2, 3).astype(dtype)
        xi, pi = (np.asarray(projs[b].project(gi)) for b in ("xla", "pallas"))
        case["int_bit_equal"] = bool(np.array_equal(xi, pi))
        case["int_max_abs_diff"] = float(np.max(np.abs(xi - pi)))
        log(f"  max|pallas - xla| = {diff:.3g} (max|xla| {ref:.3g}, agree {case['agree']}); "
            f"integer inputs bit-equal: {case['int_bit_equal']}")
        res["cases"][dtype] = case
        del g, gi, outs
    res["agree"] = all(c["agree"] for c in res["cases"].values())
    return res


def part_per_sample(sz: dict, peak: float | None) -> dict:
    from jaxgrad.gradients.per_sample import num_trainable, per_sample_projected_grads
    from jaxgrad.gradients.projection import Projector, _resolve_backend

    model, batch, build_s = shared_model(sz)
    D = num_trainable(model)
    res = model_info(sz, peak)
    res.update(build_s=round(build_s, 2), lora_dim=D, chunk_size=sz["chunk_size"],
               output_fn="logit_odds")
    if D != res["flops_per_sample"]["lora_dim"]:
        res["warning"] = f"counted D {res['flops_per_sample']['lora_dim']} != model's {D}"
    proj = Projector(seed=0, dim=D, k=sz["k"])
    res["projector_backend"] = _resolve_backend(proj)
    log(f"per-sample: N={sz['n_samples']}, chunk {sz['chunk_size']}, D={D:,}, k={sz['k']}, "
        f"projection backend {res['projector_backend']}")

    def call():
        return per_sample_projected_grads(model, batch, proj, output_fn="logit_odds",
                                          chunk_size=sz["chunk_size"])

    out, t = time_calls(call, sz["repeats"], sz["part_budget_s"])
    feats = np.asarray(out.feats)
    res.update(t)
    res.update(rates(sz["n_samples"], t["median_s"],
                     res["flops_per_sample"]["per_sample_step"], peak))
    res["feats_finite"] = bool(np.all(np.isfinite(feats)))
    res["feats_norm_mean"] = float(np.mean(np.linalg.norm(feats, axis=1)))
    log(f"  first {t['first_call_s']:.2f} s, median {t['median_s']:.4f} s: "
        f"{res['samples_per_s']} samples/s, MFU {res['mfu']}")
    return res


def part_batched(sz: dict, peak: float | None) -> dict:
    from flax import nnx

    from jaxgrad.train.losses import batch_loss

    model, batch, _ = shared_model(sz)
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

    @jax.jit
    def step(lora, rest, batch):
        def loss(p):
            return batch_loss(nnx.merge(graphdef, p, rest), batch)
        return jax.value_and_grad(loss)(lora)

    res = model_info(sz, peak)
    res["loss"] = "token-mean cross-entropy of the batch (jaxgrad.train.losses.batch_loss)"
    log(f"batched: one value_and_grad over the batch of {sz['n_samples']}")
    (loss, grads), t = time_calls(lambda: step(lora, rest, batch), sz["repeats"],
                                  sz["part_budget_s"])
    res.update(t)
    res.update(rates(sz["n_samples"], t["median_s"], res["flops_per_sample"]["batched_step"],
                     peak))
    res["loss_value"] = float(loss)
    res["grads_finite"] = bool(all(np.all(np.isfinite(np.asarray(x)))
                                   for x in jax.tree_util.tree_leaves(grads)))
    log(f"  first {t['first_call_s']:.2f} s, median {t['median_s']:.4f} s: "
        f"{res['samples_per_s']} samples/s, MFU {res['mfu']}")
    return res


def random_masks(n_subsets: int, n: int, seed: int) -> np.ndarray:
    """``n_subsets × n`` booleans, each True with probability 1/2 (random bits, unpacked)."""
    rng = np.random.default_rng(seed)
    packed = rng.integers(0, 256, (n_subsets, -(-n // 8)), dtype=np.uint8)
    return np.unpackbits(packed, axis=1)[:, :n].view(bool)


def part_surrogate(sz: dict, peak: float | None) -> dict:
    from jaxgrad.estimate.surrogate import fit_subsets

    n, k, S, chunk = sz["sur_n"], sz["sur_k"], sz["sur_subsets"], sz["sur_chunk"]
    rng = np.random.default_rng(4)
    mean_dir = rng.standard_normal(k).astype(np.float32)
    feats = jnp.asarray(0.5 * mean_dir + rng.standard_normal((n, k)).astype(np.float32))
    log(f"surrogate: N={n}, k={k}, {S:,} subsets (half the samples each), chunk {chunk}")
    t = time.perf_counter()
    masks = random_masks(S, n, seed=5)
    res = {"n": n, "k": k, "subsets": S, "chunk_size": chunk, "objective": "gradex", "C": 1e-4,
           "masks_s": round(time.perf_counter() - t, 3),
           "features": "0.5·(shared N(0,1) direction) + N(0,1) noise, float32"}

    def fit(m):
        return fit_subsets(feats, m, C=1e-4, chunk_size=chunk)

    _, one = time_calls(lambda: fit(masks[:chunk]), 1, 0.0)
    res["one_chunk"] = one
    res["compile_s"] = one["compile_s"]
    log(f"  one chunk: first {one['first_call_s']:.2f} s, then {one['median_s']:.3f} s")
    # Compiled now: every call on all the subsets is a steady-state one.
    times = []
    while len(times) < sz["sur_repeats"] and (not times or sum(times) < sz["sur_budget_s"]):
        t0 = time.perf_counter()
        fits = jax.block_until_ready(fit(masks))
        times.append(time.perf_counter() - t0)
    t = {"median_s": round(statistics.median(times), 4), "steady_s": [round(x, 4) for x in times]}
    res["full"] = t
    res["median_s"] = t["median_s"]
    res["subsets_per_s"] = round(S / t["median_s"], 1)
    it = np.asarray(fits.n_iter)
    res["n_iter_mean"], res["n_iter_max"] = float(it.mean()), int(it.max())
    res["converged_fraction"] = float(np.mean(np.asarray(fits.converged)))
    log(f"  {S:,} subsets: median {t['median_s']:.2f} s = {res['subsets_per_s']:,} subsets/s "
        f"(iterations mean {res['n_iter_mean']:.1f}, max {res['n_iter_max']}, converged "
        f"{res['converged_fraction']:.3f})")
    return res


PART_FNS = {"projection": part_projection, "per_sample": part_per_sample,
            "batched": part_batched, "surrogate": part_surrogate}


# ---------------------------------------------------------------------------------------------
# Report


def _fmt(x, spec=".3g"):
    return "—" if x is None else format(x, spec)


def markdown(data: dict) -> str:
    lines = [f"### {data['date']} — {data['device_kind']} ({data['platform']}), "
             f"jax {data['jax_version']}", "",
             f"`{data['command']}`, {data['total_s']:.0f} s in all; host {data['machine']}; "
             f"JSON: `{data.get('out', 'benchmarks/results/device_check.json')}`.", ""]
    p = data.get("projection", {})
    if "error" in p:
        lines += [f"**Projection**: error: {p['error']}", ""]
    elif "cases" in p:
        lines += [f"**Projection**, Pallas against XLA: N = {p['n']}, D = {p['dim']:,}, "
                  f"k = {p['k']}, Rademacher; agreement rule max|Δ| ≤ {p['rtol']:g}·max|xla|"
                  f"{' (Pallas in interpret mode)' if p['interpret'] else ''}.", "",
                  "| input | XLA first (s) | XLA median (s) | Pallas first (s) | Pallas median (s) "
                  "| Pallas speed-up | max abs diff / max abs | agree | integers bit-equal |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for dt, c in p["cases"].items():
            lines.append(f"| {dt} | {c['xla']['first_call_s']:.3f} | {c['xla']['median_s']:.4f} "
                         f"| {c['pallas']['first_call_s']:.3f} | {c['pallas']['median_s']:.4f} "
                         f"| {c['pallas_speedup']:.2f}× | {c['rel_diff']:.2e} | {c['agree']} "
                         f"| {c['int_bit_equal']} |")
        lines.append("")
    ps, b = data.get("per_sample", {}), data.get("batched", {})
    info = ps if "flops_per_sample" in ps else b
    if "flops_per_sample" in info:
        fl, llama = info["flops_per_sample"], info["llama"]
        peak_t = info["peak_flops"] / 1e12 if info["peak_flops"] else None
        lines += [f"**Per-sample projected gradients vs batched gradient**: random Llama of "
                  f"TinyLlama's shape ({fl['n_params'] / 1e9:.3f}B parameters: hidden "
                  f"{llama['hidden_size']}, {llama['num_hidden_layers']} layers, "
                  f"{llama['num_attention_heads']}/{llama['num_key_value_heads']} heads, MLP "
                  f"{llama['intermediate_size']}, vocabulary {llama['vocab_size']}), "
                  f"{info['dtype']}, LoRA {info['lora']}, D = {fl['lora_dim']:,}, "
                  f"T = {info['seq_len']}, k = {info['k']}, batch {info['n_samples']}"
                  + (f", per-sample chunk {ps['chunk_size']}, projection "
                     f"{ps['projector_backend']}" if "chunk_size" in ps else "") + ".", "",
                  "| contender | first call (s) | compile (s) | median (s) | samples/s "
                  "| GFLOP/sample | TFLOP/s | MFU |", "|---|---|---|---|---|---|---|---|"]
        for name, r, f in (("per-sample (fwd + bwd + projection)", ps, "per_sample_step"),
                           ("batched (fwd + bwd)", b, "batched_step")):
            if "error" in r:
                lines.append(f"| {name} | error: {r['error']} | | | | | | |")
            elif "median_s" in r:
                lines.append(f"| {name} | {r['first_call_s']:.1f} | {r['compile_s']:.1f} "
                             f"| {r['median_s']:.4f} | {r['samples_per_s']:.2f} "
                             f"| {fl[f] / 1e9:.0f} | {r['tflops']:.1f} "
                             f"| {_fmt(r['mfu'], '.1%')} |")
        if "median_s" in ps and "median_s" in b:
            lines.append("")
            ratio = ps["samples_per_s"] / b["samples_per_s"]
            lines.append(f"Per-sample gradients run at {ratio:.2f}× the batched samples/s.")
        lines += ["", f"FLOPs per sample: forward {fl['forward'] / 1e9:.0f} G (2·T·N_matmul "
                  f"{fl['forward_base_matmuls'] / 1e9:.0f} G + attention 4·L·T²·d, full square, "
                  f"{fl['forward_attention'] / 1e9:.1f} G + LoRA {fl['forward_lora'] / 1e9:.2f} G);"
                  f" backward {fl['backward'] / 1e9:.0f} G (activation gradients only, attention "
                  "×2, LoRA ×2; no weight gradients of the frozen base); projection 2·D·k "
                  f"{fl['projection'] / 1e9:.0f} G. Peak {_fmt(peak_t, '.0f')} "
                  f"TFLOP/s dense bf16 ({data['peak_source']}).", ""]
    else:
        for name, r in (("Per-sample", ps), ("Batched", b)):
            if "error" in r:
                lines += [f"**{name}**: error: {r['error']}", ""]
    s = data.get("surrogate", {})
    if "error" in s:
        lines += [f"**Surrogate fits**: error: {s['error']}", ""]
    elif "subsets_per_s" in s:
        lines += [f"**Surrogate fits** (`fit_subsets`, gradex, C = {s['C']:g}): N = {s['n']:,}, "
                  f"k = {s['k']:,}, {s['subsets']:,} subsets of about half the samples, chunks of "
                  f"{s['chunk_size']:,}: **{s['subsets_per_s']:,.0f} subsets/s** (median "
                  f"{s['median_s']:.2f} s for all, masks sent from the host); compile ≈ "
                  f"{s['compile_s']:.1f} s; iterations mean {s['n_iter_mean']:.1f}, max "
                  f"{s['n_iter_max']}; converged {s['converged_fraction']:.3f}.", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _shown_path(path: str) -> str:
    """``path`` relative to the repository when inside it, else absolute."""
    rel = os.path.relpath(os.path.abspath(path), REPO)
    return os.path.abspath(path) if rel.startswith("..") else rel


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="toy sizes (CPU, < 60 s); never writes RESULTS.md")
    ap.add_argument("--out", default=None, help=f"JSON path (default {DEFAULT_OUT})")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="dense bf16 peak of the device in TFLOP/s (default: from the table)")
    ap.add_argument("--no-results-md", action="store_true",
                    help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown parts {unknown}; choose from {PARTS}")
    out = args.out or DEFAULT_OUT
    sz = SIZES["smoke" if args.smoke else "full"]

    dev = jax.devices()[0]
    device_kind = getattr(dev, "device_kind", str(dev))
    peak = peak_flops(device_kind, args.peak_tflops)
    command = " ".join(["benchmarks/device_check.py",
                        *(sys.argv[1:] if argv is None else argv)])
    header = {"command": command, "smoke": args.smoke, "device_kind": device_kind,
              "platform": jax.default_backend(), "n_devices": jax.device_count(),
              "jax_version": jax.__version__, "peak_flops": peak, "peak_source": PEAK_SOURCE,
              "sizes": {k: v for k, v in sz.items() if k != "llama"},
              "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "out": _shown_path(out)}
    log(f"{device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"{'smoke' if args.smoke else 'full'} sizes, parts {parts}; JSON -> {out}")
    data = update_results(out, **header, **{p: {"status": "pending" if p in parts else
                                                "skipped"} for p in PARTS})
    failed = []
    for name in parts:
        t = time.perf_counter()
        try:
            result = PART_FNS[name](sz, peak)
        except Exception as e:  # noqa: BLE001 - recorded, the other parts still run
            failed.append(name)
            result = {"error": f"{type(e).__name__}: {e}"[:2000],
                      "traceback": traceback.format_exc()[-4000:]}
            log(f"{name} FAILED: {result['error']}")
        result["part_s"] = round(time.perf_counter() - t, 2)
        data = update_results(out, **{name: result})
    total = time.perf_counter() - _T0
    imported = sorted(m for m in OPTIONAL_MODULES if sys.modules.get(m) is not None)
    data = update_results(out, total_s=round(total, 1), imported_optional=imported,
                          failed=failed)
    log(f"done in {total:.1f} s; failed parts: {failed or 'none'}; optional modules imported: "
        f"{imported or 'none'}")
    if not args.smoke and not args.no_results_md:
        from common import RESULTS

        block = markdown({**data, "machine": f"{os.cpu_count()} x {cpu_model()}"})
        append_section(RESULTS, HEADING, block)
        log(f"appended to {RESULTS} under {HEADING!r}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
