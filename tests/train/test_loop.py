"""jaxgrad.train.loop (fit, run_training): the loss falls, a sharded run reproduces the 1-device
loss curve, an interrupted run resumes bit for bit, LoRA mode leaves the base alone and full mode
trains it, any Batches can be trained on.

The tiny models and data are helpers.training's; multi-device runs use 8 fake CPU devices in a
subprocess (``XLA_FLAGS`` must be set before jax starts).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import fixture, fixture_batch
from helpers.training import (LLAMA_TARGETS, leaves_dict, loss_curve, quick_cfg, run_subprocess,
                              tiny_data, tiny_model)
from jaxgrad.models import LoraConfig, load_pretrained
from jaxgrad.models.lora import split_trainable
from jaxgrad.train import Batches, checkpoint as ckpt_lib, fit, make_optimizer, run_training


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
        from helpers.training import loss_curve
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
