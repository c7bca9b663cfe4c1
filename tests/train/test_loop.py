"""Training loop: loss falls, sharded == single-device, exact resume, checkpoints, metrics, modes.

Models are tiny from-scratch Llama / T5 configs over jaxgrad's character tokenizer (vocabulary
103) trained on two small synthetic sources, so every run compiles in a second or two. LoRA
adapters cover every linear layer (the Llama LM head too): with a random base, adapters on the
attention projections alone barely move the near-uniform output distribution.

Multi-device runs use 8 fake CPU devices in a subprocess (``XLA_FLAGS`` must be set before jax
starts).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgrad.train import checkpoint as ckpt_lib
from jaxgrad.common import sharding as sharding_lib
from jaxgrad.models.forward import model_logits
from jaxgrad.models import LoraConfig, load_pretrained
from jaxgrad.pipeline.fingerprint import ConfigChangedError
from jaxgrad.config import MeshConfig, ModelSpec, TrainConfig
from jaxgrad.pipeline import check_method_sections
from jaxgrad.models.loading import load_model
from jaxgrad.models.lora import split_trainable
from jaxgrad.train import (Batches, default_extract_answer, example_batches, fit, generate,
                           loss_and_grads, make_evaluator, make_optimizer, run_training)

from helpers import fixture, fixture_batch

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)

LLAMA = dict(vocab_size=103, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8)
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                 "lm_head")
T5 = dict(vocab_size=103, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
          num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16)
T5_TARGETS = ("q", "k", "v", "o", "wi", "wo")


def tiny_model(family: str = "llama", lora: bool = True, seed: int = 0):
    """``(model, tokenizer)``: a from-scratch tiny model, the same for the same seed."""
    scratch, targets = (LLAMA, LLAMA_TARGETS) if family == "llama" else (T5, T5_TARGETS)
    spec = ModelSpec(family=family, scratch=scratch, tokenizer="char", seed=seed)
    return load_model(spec, LoraConfig(rank=4, alpha=8, target_modules=targets) if lora else None)


@functools.lru_cache(maxsize=None)
def tiny_data():
    from jaxgrad.data import SyntheticSpec, synthetic_sources

    return synthetic_sources(SyntheticSpec(tasks=("add", "copy"), target="add", noisy=(),
                                           unrelated=0, n_train=32, n_validation=8, n_test=8,
                                           max_digits=2, max_chars=4))


def quick_cfg(**overrides) -> TrainConfig:
    base = dict(learning_rate=1e-2, batch_size=8, max_length=32, epochs=1, log_every=2,
                progress=False, schedule="constant")
    return TrainConfig(**{**base, **overrides})


def loss_curve(workdir: str, *, steps: int, data: int = 1, model: int = 1,
               fsdp: bool = False) -> list[float]:
    """Per-step training losses of the tiny Llama with LoRA on a (data, model) mesh."""
    d = tiny_data()
    net, tok = tiny_model("llama")
    cfg = quick_cfg(num_steps=steps, mesh=MeshConfig(data=data, model=model, fsdp=fsdp))
    losses = []
    fit(net, tok, d.examples("train"), cfg, workdir,
        callback=lambda step, m: losses.append(float(m["loss"])))
    return losses


def run_subprocess(code: str, tmp_path, devices: int = 1) -> dict:
    """Run ``code`` in a fresh Python with ``devices`` fake CPU devices; its last stdout line."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([TESTS_DIR, REPO]))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def leaves_dict(state) -> dict[str, np.ndarray]:
    return {sharding_lib.path_name(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_lora_loss_falls(family, tmp_path):
    d = tiny_data()
    model, tok = tiny_model(family)
    losses = []
    fit(model, tok, d.examples("train"), quick_cfg(num_steps=24), str(tmp_path),
        callback=lambda step, m: losses.append(float(m["loss"])))
    first, last = losses[0], float(np.mean(losses[-4:]))
    assert len(losses) == 24
    assert last < 0.8 * first, (f"{family}: LoRA training did not reduce the loss: first step "
                                f"{first:.3f}, mean of the last 4 steps {last:.3f}")


def test_sharded_curve_matches_single_device(tmp_path):
    """A (4, 2) mesh (data x model) and its FSDP variant reproduce the 1-device loss curve.

    Tolerance 1e-4 (absolute, losses ~4): sharded matmuls sum in a different order, and six Adam
    steps amplify float32 rounding differences of ~1e-7 only mildly.
    """
    single = loss_curve(str(tmp_path / "single"), steps=6)
    out = run_subprocess(f"""
        import json, jax
        from test_train import loss_curve
        assert jax.device_count() == 8, jax.devices()
        tp = loss_curve({str(tmp_path / 'tp')!r}, steps=6, data=4, model=2)
        fsdp = loss_curve({str(tmp_path / 'fsdp')!r}, steps=6, data=4, model=2, fsdp=True)
        print(json.dumps({{"tp": tp, "fsdp": fsdp}}))
    """, tmp_path, devices=8)
    for name in ("tp", "fsdp"):
        err = np.max(np.abs(np.asarray(out[name]) - np.asarray(single)))
        assert err < 1e-4, (f"{name} on a (4, 2) mesh diverges from the 1-device run by {err:.2e}:"
                            f"\n  1 device: {single}\n  {name}: {out[name]}")


def test_resume_after_interruptions_matches_uninterrupted(tmp_path):
    """Stop cleanly at step 3, crash at step 11 (after the step-10 checkpoint), resume to 12.

    8 steps per epoch (64 examples, batch 8), so the resumptions start mid-epoch, in epochs 0 and
    1. The final checkpoint (params, optimizer
    state, step, rng) must equal the uninterrupted run's bit for bit: the data order depends only
    on (seed, epoch) and step keys are fold_in(rng, step).
    """
    d = tiny_data()
    cfg = quick_cfg(num_steps=12, save_every=5, keep_checkpoints=5)

    model, tok = tiny_model()
    first = fit(model, tok, d.examples("train"), cfg, str(tmp_path / "a"))
    # Run again on the finished run directory: nothing to do; the metrics are the saved ones.
    model, tok = tiny_model()
    again = fit(model, tok, d.examples("train"), cfg, str(tmp_path / "a"))
    assert again.step == 12 and np.isfinite(again.metrics["train_loss"])
    assert again.metrics == pytest.approx(first.metrics)

    b = str(tmp_path / "b")
    model, tok = tiny_model()
    r = fit(model, tok, d.examples("train"),
            quick_cfg(num_steps=12, save_every=5, stop_after_steps=3), b)
    assert r.step == 3

    class Crash(Exception):
        pass

    def crash(step, metrics):
        if step == 11:
            raise Crash()

    model, tok = tiny_model()
    with pytest.raises(Crash):
        fit(model, tok, d.examples("train"), cfg, b, callback=crash)
    mngr = ckpt_lib.make_manager(os.path.join(b, "ckpt"), read_only=True)
    assert sorted(mngr.all_steps()) == [3, 5, 10], f"checkpoints after the crash: " \
        f"{mngr.all_steps()}"
    meta = ckpt_lib.read_meta(mngr, 10)
    assert (meta["epoch"], meta["step_in_epoch"]) == (1, 2), meta
    mngr.close()

    model, tok = tiny_model()
    steps_seen = []
    r = fit(model, tok, d.examples("train"), cfg, b, callback=lambda s, m: steps_seen.append(s))
    assert steps_seen == [11, 12], f"resumed run did steps {steps_seen}, expected 11, 12 (ckpt 10)"
    assert r.step == 12

    states = {}
    for run in ("a", "b"):
        model, _ = tiny_model()
        _, trainable, _ = split_trainable(model)
        opt = jax.eval_shape(make_optimizer(cfg, 12).init, trainable)
        mngr = ckpt_lib.make_manager(os.path.join(tmp_path, run, "ckpt"), read_only=True)
        states[run] = ckpt_lib.restore(
            mngr, 12, params=ckpt_lib.abstract_like(trainable),
            opt_state=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), opt),
            train_state={"rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
                         "step": jax.ShapeDtypeStruct((), jnp.int32)})
        mngr.close()
    a, b_ = states["a"], states["b"]
    assert int(a["train_state"]["step"]) == int(b_["train_state"]["step"]) == 12
    np.testing.assert_array_equal(a["train_state"]["rng"], b_["train_state"]["rng"])
    for item in ("params", "opt_state"):
        la, lb = jax.tree.leaves(a[item]), jax.tree.leaves(b_[item])
        assert len(la) == len(lb) > 0
        for x, y in zip(la, lb):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                          err_msg=f"{item} differs after resume")
    rows = [json.loads(line) for line in open(os.path.join(b, "metrics.jsonl"))]
    train_steps = [row["step"] for row in rows if "train_loss" in row]
    assert train_steps == sorted(set(train_steps)), (
        f"metrics.jsonl has repeated or unordered train rows after resuming: {train_steps}")


def test_checkpoint_restores_in_fresh_process(tmp_path):
    d = tiny_data()
    model, tok = tiny_model()
    cfg = quick_cfg(num_steps=4)
    result = fit(model, tok, d.examples("train"), cfg, str(tmp_path / "run"),
                 val_examples=d.examples("validation"), sources=d.sources)
    mesh = sharding_lib.make_mesh(1, 1)
    ours = make_evaluator(result.model, tok, d.examples("validation"), cfg,
                          sources=d.sources)(result.model, mesh)["val_loss"]
    assert ours == pytest.approx(result.metrics["val_loss"], abs=1e-6)
    out = run_subprocess(f"""
        import json
        from jaxgrad.common import sharding
        from jaxgrad.train.checkpoint import restore_params
        from jaxgrad.train import make_evaluator
        from test_train import tiny_data, tiny_model, quick_cfg
        d = tiny_data()
        model, tok = tiny_model()
        ev = make_evaluator(model, tok, d.examples("validation"), quick_cfg(num_steps=4),
                            sources=d.sources)
        mesh = sharding.make_mesh(1, 1)
        before = ev(model, mesh)["val_loss"]
        model, meta = restore_params(model, {str(tmp_path / 'run' / 'ckpt')!r}, "latest")
        print(json.dumps({{"before": before, "after": ev(model, mesh)["val_loss"],
                          "step": meta["step"]}}))
    """, tmp_path)
    assert out["step"] == 4
    assert out["before"] != pytest.approx(ours, abs=1e-3), "the untrained model already matched"
    assert out["after"] == pytest.approx(ours, abs=1e-6), (
        f"restored checkpoint gives val_loss {out['after']} in a fresh process, {ours} here")


def test_per_source_metrics_in_jsonl_match_reference(tmp_path):
    """metrics.jsonl's per-source validation losses equal a numpy token-weighted cross-entropy."""
    from jaxgrad.data import batching

    d = tiny_data()
    model, tok = tiny_model()
    result = fit(model, tok, d.examples("train"), quick_cfg(num_steps=4, eval_every=2),
                 str(tmp_path), val_examples=d.examples("validation"), sources=d.sources)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4], f"eval rows at steps {[r['step'] for r in evals]}"
    last = evals[-1]
    for source in d.sources:
        exs = d.examples("validation", [source])
        enc = batching.encode_examples(exs, tok, sources=d.sources)
        batch = batching.collate(enc, range(len(exs)), max_length=32)
        logits = np.asarray(nnx.jit(model_logits)(result.model, batch), np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                                  keepdims=True)) \
            - logits.max(-1, keepdims=True)
        gold = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
        ref = float(-(gold * batch["target_mask"]).sum() / batch["target_mask"].sum())
        key = f"val_loss/{source}"
        assert key in last, f"{key} missing from the eval row {sorted(last)}"
        assert last[key] == pytest.approx(ref, rel=1e-5), f"{key}: {last[key]} vs reference {ref}"


def test_accuracy_counts_exact_matches_per_source(tmp_path):
    """With an extractor that always answers "yes", accuracy is the share of answers "yes"."""
    d = tiny_data()
    model, tok = tiny_model()
    exs = d.examples("validation")
    for i, e in enumerate(exs):
        e["answer"] = "yes" if i % 4 == 0 else ("no" if i % 4 == 1 else None)
    cfg = quick_cfg(num_steps=1, max_new_tokens=3)
    ev = make_evaluator(model, tok, exs, cfg, sources=d.sources, extract_answer=lambda t: "yes")
    metrics = ev(model, sharding_lib.make_mesh(1, 1))
    for source in d.sources:
        scored = [e for e in exs if e["source"] == source and e["answer"] is not None]
        want = np.mean([e["answer"] == "yes" for e in scored])
        assert metrics[f"val_acc/{source}"] == pytest.approx(want), (source, metrics)
    assert metrics["val_acc"] == pytest.approx(0.5)


def test_grad_accumulation_equals_one_big_batch():
    d = tiny_data()
    model, tok = tiny_model()
    batches = example_batches(d.examples("train"), tok, batch_size=8, max_length=32, shuffle=True)
    batch = {k: jnp.asarray(v) for k, v in next(iter(batches.iterate(0, 0))).items()}
    per_micro = np.asarray(batch["target_mask"]).sum(1).reshape(2, 4).T.sum(1)
    assert len(set(per_micro.tolist())) > 1, "test needs micro-batches with unequal token counts"
    graphdef, trainable, frozen = split_trainable(model)
    grads = jax.jit(loss_and_grads, static_argnums=0, static_argnames="grad_accum_steps")
    loss1, g1 = grads(graphdef, trainable, frozen, batch, None, grad_accum_steps=1)
    loss4, g4 = grads(graphdef, trainable, frozen, batch, None, grad_accum_steps=4)
    assert float(loss4) == pytest.approx(float(loss1), rel=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g1)[0], jax.tree.leaves(g4)):
        # Micro-batches sum in another order: float32 rounding of the largest terms (~1e-7 of
        # the leaf's largest entry) can dominate an entry that cancels to near zero.
        a = np.asarray(a)
        np.testing.assert_allclose(np.asarray(b), a, rtol=1e-5, atol=1e-6 * np.abs(a).max(),
                                   err_msg=f"gradient of {sharding_lib.path_name(path)}")


def test_bfloat16_compute_keeps_float32_adapters_and_gradients():
    """bfloat16 compute and base weights: same loss as float32 to bf16 precision; the adapters and
    their gradients stay float32 (the optimizer never updates bf16 numbers)."""
    d = tiny_data()
    losses = {}
    for dtype in ("float32", "bfloat16"):
        spec = ModelSpec(family="llama", scratch=LLAMA, tokenizer="char", dtype=dtype,
                         param_dtype=dtype)
        model, tok = load_model(spec, LoraConfig(rank=4, alpha=8, target_modules=LLAMA_TARGETS))
        batch = next(iter(example_batches(d.examples("train"), tok, batch_size=8, max_length=32,
                                          shuffle=False).iterate(0, 0)))
        graphdef, trainable, frozen = split_trainable(model)
        grads_fn = jax.jit(loss_and_grads, static_argnums=0)
        loss, grads = grads_fn(graphdef, trainable, frozen, batch, None)
        losses[dtype] = float(loss)
        assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
        assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(dtype)}
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=1e-2), losses


def test_lora_mode_freezes_base_and_full_mode_updates_it(tmp_path):
    d = tiny_data()
    for full in (False, True):
        model, tok = tiny_model()
        before = leaves_dict(nnx.state(model, nnx.Param))
        fit(model, tok, d.examples("train"), quick_cfg(num_steps=3, full_finetune=full),
            str(tmp_path / str(full)))
        after = leaves_dict(nnx.state(model, nnx.Param))
        assert after.keys() == before.keys()
        base = [k for k in before if ".lora_" not in k]
        lora_b = [k for k in before if k.endswith(".lora_B")]
        changed = {k for k in before if not np.array_equal(before[k], after[k])}
        assert set(lora_b) <= changed, f"full={full}: LoRA B factors did not train"
        if full:
            assert {k for k in base if k.endswith("proj.weight")} <= changed, (
                "full fine-tuning left base projection weights unchanged")
        else:
            assert not changed & set(base), (
                f"LoRA mode changed base params {sorted(changed & set(base))}")


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_generate_is_greedy(family):
    """Every generated token is the argmax of a teacher-forced forward pass over the prompt and
    the tokens generated before it (the definition of greedy decoding), for prompts of different
    lengths batched together, up to and including eos; pad after eos."""
    model, tok = tiny_model(family, seed=3)
    prompts = ["12+3=", "copy ab>", "7+88="]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids = [[tok.bos_token_id] + x if family == "llama" else x + [tok.eos_token_id] for x in ids]
    n, eos = 6, tok.eos_token_id
    input_ids, mask = right_pad(ids)
    got = np.asarray(generate(model, input_ids, mask, max_new_tokens=n, eos_id=eos))
    assert got.shape == (3, n)
    gens = []
    for row in got.tolist():
        k = row.index(eos) + 1 if eos in row else n
        assert row[k:] == [0] * (n - k), f"tokens after eos are not pad: {row}"
        gens.append(row[:k])
    forward = nnx.jit(lambda m, *args: m(*args))
    if family == "llama":
        seq_ids, seq_mask = right_pad([x + g for x, g in zip(ids, gens)])
        logits = np.asarray(forward(model, seq_ids, seq_mask))
        for r, (x, g) in enumerate(zip(ids, gens)):
            want = logits[r, len(x) - 1:len(x) - 1 + len(g)].argmax(-1)
            np.testing.assert_array_equal(g, want, err_msg=f"row {r} ({prompts[r]!r})")
    else:
        dec_ids, dec_mask = right_pad([[0] + g[:-1] for g in gens])
        logits = np.asarray(forward(model, input_ids, mask, dec_ids, dec_mask))
        for r, g in enumerate(gens):
            np.testing.assert_array_equal(g, logits[r, :len(g)].argmax(-1),
                                          err_msg=f"row {r} ({prompts[r]!r})")


def right_pad(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, rows))
    ids = np.array([x + [0] * (width - len(x)) for x in rows], np.int32)
    mask = np.array([[1] * len(x) + [0] * (width - len(x)) for x in rows], np.int32)
    return ids, mask


def test_run_training_on_hand_built_batches(tmp_path):
    """run_training takes any Batches; a fixed batch repeated is overfitted."""
    model, _ = load_pretrained(fixture("tiny-llama"),
                               lora=LoraConfig(rank=4, target_modules=LLAMA_TARGETS),
                               with_tokenizer=False)
    batch = fixture_batch("tiny-llama")
    rows = batch["input_ids"].shape[0]
    batch = {k: np.concatenate([v] * (8 // rows + 1))[:8] for k, v in batch.items()}
    train = Batches(iterate=lambda epoch, start: iter([batch] * (4 - start)), steps_per_epoch=4)
    losses = []
    r = run_training(model, train, quick_cfg(epochs=3, learning_rate=2e-2), str(tmp_path),
                     callback=lambda s, m: losses.append(float(m["loss"])))
    assert r.step == 12 and r.best_step == 12
    assert losses[-1] < 0.7 * losses[0], f"fixed batch not overfitted: {losses}"


def test_sgd_optimizer_is_plain_gradient_descent():
    """optimizer="sgd": the update is -lr·g (no momentum, no normalisation), clipped by the global
    norm first, plus -lr·weight_decay·p on matrices only; unknown optimizers are refused."""
    params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([1.0, 2.0])}
    grads = {"w": jnp.array([[0.3, 0.0], [-0.4, 0.0]]), "b": jnp.array([0.0, 1.2])}  # norm 1.3
    cfg = TrainConfig(optimizer="sgd", learning_rate=0.5, schedule="constant", num_steps=1,
                      max_grad_norm=0.0)
    tx = make_optimizer(cfg, 1)
    updates, _ = tx.update(grads, tx.init(params), params)
    for name in params:
        np.testing.assert_allclose(updates[name], -0.5 * grads[name], rtol=1e-6)
    tx = make_optimizer(dataclasses.replace(cfg, max_grad_norm=0.65), 1)  # halves the gradient
    updates, _ = tx.update(grads, tx.init(params), params)
    for name in params:
        np.testing.assert_allclose(updates[name], -0.25 * grads[name], rtol=1e-5, atol=1e-7)
    tx = make_optimizer(dataclasses.replace(cfg, weight_decay=0.1), 1)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.5 * (grads["w"] + 0.1 * params["w"]), rtol=1e-6)
    np.testing.assert_allclose(updates["b"], -0.5 * grads["b"], rtol=1e-6)  # no decay on vectors
    adam = make_optimizer(dataclasses.replace(cfg, optimizer="adamw"), 1)
    updates, _ = adam.update(grads, adam.init(params), params)  # Adam's first step: ~ -lr·sign(g)
    np.testing.assert_allclose(updates["b"], [0.0, -0.5], atol=1e-5)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lion")


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="exponential")
    with pytest.raises(ValueError, match="grad_accum_steps"):
        TrainConfig(batch_size=6, grad_accum_steps=4)
    with pytest.raises(ValueError, match="unknown keys.*learning_rat"):
        TrainConfig.from_config({"learning_rat": 1e-3})
    cfg = TrainConfig.from_config({"learning_rate": 1e-3, "batch_size": 4},
                                  {"data": 2, "model": 1, "fsdp": True, "rules": None})
    assert cfg.mesh == MeshConfig(data=2, model=1, fsdp=True) and cfg.batch_size == 4
    model, _ = tiny_model(lora=False)
    with pytest.raises(ValueError, match="LoRA adapters"):
        split_trainable(model)


def test_default_extract_answer():
    assert default_extract_answer("2+9=11,1+0+1=2 = 21 ") == "21"
    assert default_extract_answer("so the answer is 42.") == "42"
    assert default_extract_answer("a=1, thus the answer is b") == "b"
    assert default_extract_answer(" plain ") == "plain"


def test_losses_token_weighted_and_padding_rows_excluded():
    """jaxgrad.train.losses against numpy: per-example mean CE, and the batch loss
    Σ valid·mask·CE / Σ valid·mask (a padding row with a nonzero mask must not count)."""
    from jaxgrad.train.losses import batch_loss, token_cross_entropy

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(3, 4)).astype(np.int32)
    mask = np.array([[1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1]], np.float32)
    valid = np.array([1, 1, 0], np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    per_example = (ce * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(token_cross_entropy(logits, targets, mask), per_example, rtol=1e-6)
    batch = {"targets": targets, "target_mask": mask, "valid": valid}
    want = (ce * mask * valid[:, None]).sum() / (mask * valid[:, None]).sum()
    assert float(batch_loss(lambda b: jnp.asarray(logits), batch)) == pytest.approx(want, rel=1e-6)
    model, _ = tiny_model()
    with pytest.raises(ValueError, match="lacks.*attention_mask"):
        model_logits(model, {"input_ids": np.zeros((1, 3), np.int32)})


def config_module(name: str):
    """configs/<name>.py loaded by path (configs/ is not an installed package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"configs_{name}",
                                                  os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name,variants", [("demo", (None, "tiny")),
                                           ("llama_alpaca", (None, "bf16")),
                                           ("t5_cot", (None, "bf16"))])
def test_configs_convert_to_typed_configs(name, variants):
    """Every config file and variant yields valid TrainConfig / ModelSpec / LoraConfig and sets
    only keys its sections define (the check run_pipeline makes before the first stage; that it
    refuses a misspelt key is tested in test_pipeline.py)."""
    from jaxgrad.models.loading import lora_from_config

    module = config_module(name)
    for variant in variants:
        c = module.get_config(variant)
        cfg = TrainConfig.from_config(c.train, c.mesh)
        spec = ModelSpec.from_config(c.model)
        lora = lora_from_config(c.lora)
        assert cfg.batch_size % cfg.grad_accum_steps == 0 and lora.rank > 0
        assert spec.name_or_path or spec.scratch, f"{name}:{variant} names no model"
        assert set(c) >= {"model", "lora", "data", "train", "mesh", "finetune"}
        check_method_sections(c)  # raises, naming them, on keys no section defines
    with pytest.raises(ValueError, match="unknown variant"):
        module.get_config("nope")


def test_meta_train_and_finetune_stages_on_tiny_demo(tmp_path):
    """The stages end to end on configs/demo.py:tiny: run layout, PEFT adapter round trip, the
    selection-file path of finetune and its test-split metrics."""
    from jaxgrad.models import load_peft_adapter
    from jaxgrad.pipeline.finetune import finetune
    from jaxgrad.train.stage import meta_train

    config = config_module("demo").get_config("tiny")
    result = meta_train(config, str(tmp_path))
    run = tmp_path / "meta_train"
    assert {"ckpt", "metrics.jsonl", "adapter", "config.json"} <= set(os.listdir(run))
    assert {"val_loss/add", "val_loss/copy", "val_acc/add"} <= set(result.metrics)
    fresh, _ = load_model(ModelSpec.from_config(config.model), None)
    load_peft_adapter(fresh, str(run / "adapter"))
    ours, theirs = (leaves_dict(nnx.state(m, nnx.LoRAParam)) for m in (result.model, fresh))
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_array_equal(theirs[k], ours[k], err_msg=f"adapter round trip: {k}")

    (tmp_path / "selected.json").write_text(json.dumps({"sources": ["copy"]}))
    config.finetune.selection_file = str(tmp_path / "selected.json")
    result = finetune(config, str(tmp_path))
    summary = json.loads((tmp_path / "finetune" / "copy" / "sources.json").read_text())
    assert summary["sources"] == ["copy"]
    assert {"test_loss", "test_loss/add", "val_loss/add"} <= set(summary["metrics"])
    assert "val_loss/copy" not in summary["metrics"], "finetune must validate on the target only"

    # issue 16, item 2: a fine-tune is reused only under the settings it was made with; a finished
    # one is returned as recorded: nothing trained, evaluated or appended to metrics.jsonl again
    metrics_file = tmp_path / "finetune" / "copy" / "metrics.jsonl"
    rows = metrics_file.read_text()
    again = finetune(config, str(tmp_path))
    assert again.step == result.step and again.metrics == summary["metrics"]
    assert metrics_file.read_text() == rows, "a reused fine-tune must not append metrics rows"
    got = leaves_dict(nnx.state(again.model, nnx.LoRAParam))
    want = leaves_dict(nnx.state(result.model, nnx.LoRAParam))
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"reused adapter: {k}")
    cases = [("train.learning_rate", lambda c: setattr(c.train, "learning_rate", 0.5)),
             ("lora.rank", lambda c: setattr(c.lora, "rank", 2)),
             ("finetune.units", lambda c: (setattr(c.finetune, "selection_file", ""),
                                           setattr(c.finetune, "sources", "add"),
                                           setattr(c.finetune, "name", "copy")))]
    for key, change in cases:
        changed = copy.deepcopy(config)
        change(changed)
        before = (tmp_path / "finetune" / "copy" / "config.json").read_text()
        with pytest.raises(ConfigChangedError, match=re.escape(key)):
            finetune(changed, str(tmp_path))
        assert (tmp_path / "finetune" / "copy" / "config.json").read_text() == before, \
            f"a refused fine-tune ({key}) must leave the old run as it was"
    changed = copy.deepcopy(config)
    changed.train.learning_rate = 0.5
    changed.pipeline.on_config_change = "rerun"
    finetune(changed, str(tmp_path))
    run_record = json.loads((tmp_path / "finetune" / "copy" / "run.json").read_text())
    assert run_record["values"]["train.learning_rate"] == 0.5


def test_finetune_sources_from_a_selection_file(tmp_path):
    """selection_file: the selection stage's selection.json gives its "selected" list (not the
    "sources" list, which names every source), a {"sources": [...]} object its list, a JSON list
    or one name per line as they are; unknown names and empty choices are refused."""
    from jaxgrad.pipeline.finetune import finetune_sources

    available = ["add", "copy", "noisy_add"]
    stage_output = tmp_path / "selection.json"
    stage_output.write_text(json.dumps({"sources": available, "selected": ["copy"]}))
    assert finetune_sources({"selection_file": str(stage_output)}, available) == ["copy"]
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"sources": ["add", "copy"]}))
    assert finetune_sources({"selection_file": str(plain)}, available) == ["add", "copy"]
    lines = tmp_path / "names.txt"
    lines.write_text("noisy_add\n\nadd\n")
    assert finetune_sources({"selection_file": str(lines)}, available) == ["noisy_add", "add"]
    assert finetune_sources({"sources": "add, copy"}, available) == ["add", "copy"]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"chosen": ["add"]}))
    with pytest.raises(ValueError, match="needs a 'selected' or 'sources' list"):
        finetune_sources({"selection_file": str(other)}, available)
    with pytest.raises(ValueError, match=r"unknown sources \['sub'\]"):
        finetune_sources({"sources": "sub"}, available)
    with pytest.raises(ValueError, match="names no sources"):
        finetune_sources({"sources": ""}, available)


def test_accuracy_with_filler_rows_in_the_last_batch():
    """The last evaluation batch is filled up with all-zero rows; generation must accept them
    (they are not a padding layout error) and they must not count."""
    d = tiny_data()
    model, tok = tiny_model()
    cfg = quick_cfg(num_steps=1, max_new_tokens=2)
    exs = d.examples("validation")
    exs = exs[:cfg.batch_size + 1]  # one full batch and a batch with one real row
    for e in exs:
        e["answer"] = "yes"
    ev = make_evaluator(model, tok, exs, cfg, sources=d.sources, extract_answer=lambda t: "yes")
    metrics = ev(model, sharding_lib.make_mesh(1, 1))
    assert metrics["val_acc"] == pytest.approx(1.0)


def test_opening_a_checkpoint_read_only_logs_no_orbax_notice(tmp_path, caplog):
    """issue 16, item 8: restoring θ* (read-only) does not print orbax's read-only warnings."""
    import logging

    writer = ckpt_lib.make_manager(tmp_path / "ckpt", async_save=False)
    writer.close()
    with caplog.at_level(logging.WARNING):
        reader = ckpt_lib.make_manager(tmp_path / "ckpt", read_only=True, async_save=False)
        reader.close()
    noisy = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not noisy, noisy
