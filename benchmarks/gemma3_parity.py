r"""Gemma 3 270M (real weights, Q4_K_M GGUF): jaxgrad's logits against transformers', and the time
of projected per-sample LoRA gradients.

Gemma terms of use apply to the weights (``python scripts/fetch_gemma3.py`` fetches them and puts
the terms beside them).

1. ``jaxgrad.models.load_pretrained(<gguf>)``: the GGUF is dequantised to float32 once by
   transformers (``jaxgrad.models.gguf``; the cached ``<stem>.hf/`` directory is transformers' own
   reading of the file) and loaded by jaxgrad; the reference is
   ``transformers.AutoModelForCausalLM.from_pretrained(<that directory>)`` in torch, float32, its
   default attention (sdpa).
2. A right-padded batch of real text (the Gemma terms of use shipped with the weights, tags
   stripped, tokenised with the GGUF's tokenizer, BOS first): row 0 holds ``--long`` tokens, more
   than the 512-token sliding window, so the sliding layers' window and the full layers both
   matter; row 1 ``--short`` tokens of a later passage, then padding. float32 logits are compared
   on real tokens: max |Δlogit|, relative to max |logit|, argmax agreement, and each model's mean
   next-token loss (a sanity check that the weights are right: a Gemma whose norms were off by
   the GGUF's +1 would not predict text).
3. LoRA rank 4 on q/k/v (jaxgrad's defaults, B drawn nonzero so every adapter gradient is
   informative), ``per_sample_projected_grads`` (``token_ce``, k = 1024) on ``--grad-samples``
   rows of ``--grad-len`` tokens: the first call (with compilation) and a second one are timed.

Writes ``benchmarks/results/gemma3_parity.json`` (machine, date, command, figures) and prints a
markdown block for ``benchmarks/RESULTS.md``.

Usage (from the repository root; about 2 minutes on 2 CPU cores once the GGUF is converted, the
first conversion adds about 3)::

    python scripts/fetch_gemma3.py
    python benchmarks/gemma3_parity.py
"""

from __future__ import annotations

import argparse
import datetime
import html.parser
import json
import os
import platform
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_model  # benchmarks/common.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_GGUF = os.path.join(ROOT, "checkpoints", "assets", "gemma3", "gemma-3-270m-q4_k_m.gguf")
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "gemma3_parity.json")


def log(msg: str) -> None:
    print(f"[gemma3_parity] {msg}", flush=True)


class _Text(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.parts, self._skip = [], 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag):
        self._skip -= tag in ("script", "style") and self._skip > 0

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def terms_text(path: str) -> str:
    """The visible text of the Gemma terms page, whitespace collapsed, from its heading on."""
    parser = _Text()
    with open(path, encoding="utf-8") as f:
        parser.feed(f.read())
    text = re.sub(r"\s+", " ", " ".join(parser.parts)).strip()
    start = text.find("Gemma Terms of Use")
    return text[start:] if start >= 0 else text


def build_batch(tok, text: str, long: int, short: int):
    ids = tok(text).input_ids  # BOS first
    if len(ids) < long + short:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than --long + --short")
    rows = [ids[:long], [ids[0]] + ids[long:long + short - 1]]
    input_ids = np.full((2, long), tok.pad_token_id, np.int32)
    mask = np.zeros((2, long), np.int32)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return input_ids, mask


def next_token_loss(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> float:
    """Mean cross-entropy of each real token given the ones before it (float64)."""
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        lg = logits[b, :n - 1].astype(np.float64)
        lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        total += float((lse - lg[np.arange(n - 1), ids[b, 1:n]]).sum())
        count += n - 1
    return total / count


def compare(ours: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> dict:
    real = mask > 0
    diff = np.abs(ours - ref)[real]
    scale = float(np.abs(ref[real]).max())
    argmax = (ours.argmax(-1) == ref.argmax(-1))[real]
    rows = [float(np.abs(ours[b] - ref[b])[mask[b] > 0].max()) for b in range(ours.shape[0])]
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "max_abs_logit": scale, "relative_max_diff": float(diff.max()) / scale,
            "max_abs_diff_per_row": rows, "argmax_agreement": float(argmax.mean())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", default=DEFAULT_GGUF)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--long", type=int, default=600, help="tokens of row 0 (> the 512 window)")
    p.add_argument("--short", type=int, default=200, help="real tokens of row 1")
    p.add_argument("--grad-samples", type=int, default=4)
    p.add_argument("--grad-len", type=int, default=128)
    p.add_argument("--k", type=int, default=1024)
    args = p.parse_args(argv)
    if not os.path.isfile(args.gguf):
        raise SystemExit(f"{args.gguf} is missing: run python scripts/fetch_gemma3.py first")

    import jax
    import torch
    import transformers
    from flax import nnx

    from jaxgrad.models import LoraConfig, apply_lora, load_pretrained
    from jaxgrad.models.gguf import gguf_to_hf
    from jaxgrad.gradients.per_sample import num_trainable, per_sample_projected_grads
    from jaxgrad.gradients.projection import Projector

    threads = torch.get_num_threads()
    t = time.perf_counter()
    hf_dir = gguf_to_hf(args.gguf)  # converts once, then reuses the cache
    t_convert = time.perf_counter() - t
    t = time.perf_counter()
    model, tok = load_pretrained(args.gguf)
    t_load = time.perf_counter() - t
    cfg = model.config
    log(f"jaxgrad loaded {os.path.basename(args.gguf)} in {t_load:.1f} s: {cfg.num_hidden_layers} "
        f"layers, window {cfg.sliding_window}, layer types "
        + "".join("S" if cfg.is_sliding(i) else "F" for i in range(cfg.num_hidden_layers)))
    text = terms_text(os.path.join(os.path.dirname(args.gguf), "GEMMA_TERMS.html"))
    ids, mask = build_batch(tok, text, args.long, args.short)

    forward = nnx.jit(lambda m, i, a: m(i, a))
    t = time.perf_counter()
    ours = np.asarray(forward(model, ids, mask))
    t_ours_first = time.perf_counter() - t
    t = time.perf_counter()
    ours = np.asarray(forward(model, ids, mask))
    t_ours = time.perf_counter() - t
    log(f"jaxgrad forward {ids.shape}: {t_ours_first:.1f} s with compilation, {t_ours:.1f} s after")

    t = time.perf_counter()
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    t_torch_load = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(ids, dtype=torch.long),
                        attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
    t_torch = time.perf_counter() - t
    attn_impl = ref_model.config._attn_implementation
    del ref_model
    log(f"torch forward: {t_torch:.1f} s ({attn_impl})")
    parity = compare(ours, ref, mask)
    parity["loss_jaxgrad"] = next_token_loss(ours, ids, mask)
    parity["loss_torch"] = next_token_loss(ref, ids, mask)
    log(f"max |Δlogit| {parity['max_abs_diff']:.2e} (relative {parity['relative_max_diff']:.1e}), "
        f"argmax agreement {parity['argmax_agreement']:.4f}, loss {parity['loss_jaxgrad']:.4f} "
        f"vs {parity['loss_torch']:.4f}")
    del ours, ref

    # Per-sample projected gradients: LoRA r=4 on q/k/v, B nonzero.
    lora = LoraConfig(rank=4, alpha=8.0)
    apply_lora(model, lora)
    rng = np.random.default_rng(0)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.LoRAParam) and path[-1] == "lora_B":
            var.set_value(jax.numpy.asarray(rng.normal(0, 0.01, var.shape), var.dtype))
    n, length = args.grad_samples, args.grad_len
    gids = tok(text).input_ids
    rows = [[gids[0]] + gids[1 + i * length:(i + 1) * length] for i in range(n)]
    g_ids = np.asarray(rows, np.int32)
    g_mask = np.ones_like(g_ids)
    targets = np.concatenate([g_ids[:, 1:], np.zeros((n, 1), np.int32)], axis=1)
    tmask = np.concatenate([np.ones((n, length - 1)), np.zeros((n, 1))], axis=1).astype(np.float32)
    batch = {"input_ids": g_ids, "attention_mask": g_mask, "targets": targets, "target_mask": tmask,
             "valid": np.ones((n,), np.float32), "example_index": np.arange(n, dtype=np.int32),
             "source_index": np.zeros((n,), np.int32)}
    dim = num_trainable(model)
    proj = Projector(seed=0, dim=dim, k=args.k)
    t = time.perf_counter()
    res = per_sample_projected_grads(model, batch, proj, "token_ce", chunk_size=n)
    feats = np.asarray(res.feats)
    t_grad_first = time.perf_counter() - t
    t = time.perf_counter()
    res = per_sample_projected_grads(model, batch, proj, "token_ce", chunk_size=n)
    feats = np.asarray(res.feats)
    t_grad = time.perf_counter() - t
    log(f"per_sample_projected_grads {n} x {length} tokens, D = {dim}, k = {args.k}: "
        f"{t_grad_first:.1f} s with compilation, {t_grad:.1f} s after")

    with open(os.path.join(hf_dir, "config.json")) as f:
        src = json.load(f).get("gguf_source", {})
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()} x {cpu_model()}",
        "command": " ".join(["python benchmarks/gemma3_parity.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "versions": {"jax": jax.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version(),
                     "torch_threads": threads},
        "checkpoint": {"gguf": os.path.basename(args.gguf), "sha256": src.get("sha256"),
                       "quantization": src.get("quantization"), "dequantized_to": "float32",
                       "layers": cfg.num_hidden_layers, "sliding_window": cfg.sliding_window,
                       "full_layers": [i for i in range(cfg.num_hidden_layers) if not cfg.is_sliding(i)],
                       "vocab_size": cfg.vocab_size},
        "batch": {"text": "Gemma terms of use (GEMMA_TERMS.html shipped with the weights), tags stripped",
                  "shape": list(ids.shape), "real_tokens_per_row": mask.sum(1).tolist(),
                  "padding": "right"},
        "parity": {**parity, "reference": f"transformers {transformers.__version__} "
                                          f"Gemma3ForCausalLM, torch float32, {attn_impl}"},
        "seconds": {"gguf_convert_or_cache_check": round(t_convert, 2), "jaxgrad_load": round(t_load, 2),
                    "jaxgrad_forward_first": round(t_ours_first, 2), "jaxgrad_forward": round(t_ours, 2),
                    "torch_load": round(t_torch_load, 2), "torch_forward": round(t_torch, 2)},
        "per_sample_grads": {"lora": "rank 4, alpha 8, q_proj/k_proj/v_proj, B ~ N(0, 0.01)",
                             "samples": n, "tokens_per_sample": length, "trainable_D": dim,
                             "k": args.k, "output_fn": "token_ce", "chunk_size": n,
                             "seconds_first_call": round(t_grad_first, 2),
                             "seconds": round(t_grad, 2),
                             "feats_finite": bool(np.isfinite(feats).all()),
                             "feats_norm_mean": float(np.linalg.norm(feats, axis=1).mean())},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    log(f"wrote {args.out}")
    print(markdown(result))
    return result


def markdown(r: dict) -> str:
    p, s, g, c = r["parity"], r["seconds"], r["per_sample_grads"], r["checkpoint"]
    return "\n".join([
        "## Gemma 3 270M parity with transformers (CPU)", "",
        f"### {r['date']} — {r['machine']}", "",
        f"Command: `{r['command'].strip()}` (weights: `python scripts/fetch_gemma3.py`; Gemma terms "
        f"of use apply). {c['gguf']} ({c['quantization']}, dequantised to float32 by transformers), "
        f"{c['layers']} layers, full attention at layers {c['full_layers']}, sliding window "
        f"{c['sliding_window']}. Reference: {p['reference']}; jax {r['versions']['jax']}.", "",
        "| batch (right-padded) | max abs Δlogit | max abs logit | relative | argmax agreement | "
        "next-token loss jaxgrad / torch |",
        "|---|---|---|---|---|---|",
        f"| {r['batch']['shape'][0]} rows × {r['batch']['shape'][1]}, real tokens "
        f"{r['batch']['real_tokens_per_row']} | {p['max_abs_diff']:.2e} | {p['max_abs_logit']:.1f} | "
        f"{p['relative_max_diff']:.1e} | {p['argmax_agreement']:.4f} | "
        f"{p['loss_jaxgrad']:.4f} / {p['loss_torch']:.4f} |", "",
        f"Forward of that batch: jaxgrad {s['jaxgrad_forward']:.1f} s after compilation "
        f"({s['jaxgrad_forward_first']:.1f} s first call), torch {s['torch_forward']:.1f} s. "
        f"`per_sample_projected_grads` (LoRA {g['lora']}, D = {g['trainable_D']:,}, k = {g['k']}, "
        f"{g['output_fn']}): {g['samples']} samples × {g['tokens_per_sample']} tokens in "
        f"{g['seconds']:.1f} s ({g['seconds_first_call']:.1f} s with compilation).",
    ])


if __name__ == "__main__":
    main()
