"""jaxgrad.train.loop (fit, run_training): the loss falls, a sharded run reproduces the 1-device
loss curve, an interrupted run resumes bit for bit, LoRA mode leaves the base alone and full mode
trains it, any Batches can be trained on; Ctrl-C saves a checkpoint at the step reached and the
rerun ends as an uninterrupted run does.

The tiny models and data are helpers.training's; multi-device runs use 8 fake CPU devices in a
subprocess (``XLA_FLAGS`` must be set before jax starts).
"""

from __future__ import annotations

import functools
import gc
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import fixture, fixture_batch
from helpers.training import (
    LLAMA_TARGETS,
    leaves_dict,
    loss_curve,
    quick_cfg,
    run_subprocess,
    tiny_data,
    tiny_model,
)

from jaxgrad.config import ModelSpec, TrainConfig
from jaxgrad.models import LoraConfig, load_pretrained
from jaxgrad.models.loading import load_model
from jaxgrad.models.lora import split_trainable
from jaxgrad.train import Batches, fit, make_optimizer, run_training
from jaxgrad.train import checkpoint as ckpt_lib


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
    assert_same_state(a, b_)  # rng, params and optimizer state bit for bit after the resume
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


# Ctrl-C during training (new-user trial): a checkpoint at the step reached, a rerun that resumes
# there and ends as an uninterrupted run does, a second Ctrl-C during that save that leaves the
# checkpoints usable, metrics.jsonl holding the history of the run that produced the result only,
# and the progress bar closed before anything is printed about the interruption. The model is a
# from-scratch one-layer Llama with LoRA on two small synthetic sources (64 train examples, batch
# 8: 8 steps per epoch), 12 steps: an interruption at step 7 resumes mid-epoch and the run crosses
# an epoch boundary after it. save_every=100 is the demo's situation (a checkpoint only at the
# end), so without a checkpoint on Ctrl-C a rerun would start from step 0.

STEPS = 12


LLAMA = dict(vocab_size=103, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8)


TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def interrupt_model():
    spec = ModelSpec(family="llama", scratch=LLAMA, tokenizer="char", seed=0)
    return load_model(spec, LoraConfig(rank=4, alpha=8, target_modules=TARGETS))


@functools.lru_cache(maxsize=None)
def train_examples():
    from jaxgrad.data import SyntheticSpec, synthetic_sources

    data = synthetic_sources(SyntheticSpec(tasks=("add", "copy"), target="add", noisy=(),
                                           unrelated=0, n_train=32, n_validation=8, n_test=8,
                                           max_digits=2, max_chars=4))
    return data.examples("train")


def cfg(**overrides) -> TrainConfig:
    base = dict(learning_rate=1e-2, batch_size=8, max_length=32, num_steps=STEPS, log_every=2,
                save_every=100, progress=False, schedule="linear", warmup_steps=2)
    return TrainConfig(**{**base, **overrides})


def train(workdir, config: TrainConfig, callback=None):
    model, tok = interrupt_model()
    return fit(model, tok, train_examples(), config, str(workdir), callback=callback)


def interrupt_at(step: int, seen: list | None = None):
    """A callback raising KeyboardInterrupt (what Ctrl-C raises) after ``step``."""
    def callback(s, metrics):
        if seen is not None:
            seen.append(s)
        if s == step:
            raise KeyboardInterrupt
    return callback


def steps_of(workdir) -> list[int]:
    mngr = ckpt_lib.make_manager(os.path.join(workdir, "ckpt"), read_only=True)
    try:
        return sorted(mngr.all_steps())
    finally:
        mngr.close()


def final_state(workdir, step: int = STEPS) -> dict:
    model, _ = interrupt_model()
    _, trainable, _ = split_trainable(model)
    opt = jax.eval_shape(make_optimizer(cfg(), STEPS).init, trainable)
    mngr = ckpt_lib.make_manager(os.path.join(workdir, "ckpt"), read_only=True)
    try:
        return ckpt_lib.restore(
            mngr, step, params=ckpt_lib.abstract_like(trainable),
            opt_state=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), opt),
            train_state={"rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
                         "step": jax.ShapeDtypeStruct((), jnp.int32)})
    finally:
        mngr.close()


def metrics_rows(workdir) -> list[dict]:
    """metrics.jsonl without the wall-clock seconds."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f]


def assert_same_state(a: dict, b: dict) -> None:
    np.testing.assert_array_equal(a["train_state"]["rng"], b["train_state"]["rng"])
    assert int(a["train_state"]["step"]) == int(b["train_state"]["step"])
    for item in ("params", "opt_state"):
        la, lb = jax.tree.leaves(a[item]), jax.tree.leaves(b[item])
        assert len(la) == len(lb) > 0
        for x, y in zip(la, lb):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                          err_msg=f"{item} differs from the uninterrupted run's")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The final checkpoint and metrics.jsonl rows of the run never interrupted."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = train(workdir, cfg())
    assert result.step == STEPS
    return {"state": final_state(workdir), "rows": metrics_rows(workdir),
            "metrics": result.metrics}


def test_ctrl_c_saves_a_checkpoint_and_the_rerun_ends_as_an_uninterrupted_run(tmp_path,
                                                                              uninterrupted):
    """Ctrl-C at step 7 of 12 with no checkpoint due before step 12: a checkpoint at step 7, and
    the rerun does steps 8..12 only and ends bit for bit in the uninterrupted run's state (data
    order (seed, epoch), step keys fold_in(rng, step)), with the same metrics.jsonl rows (the
    loss averages in progress at step 7 are saved with its checkpoint) and result metrics."""
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, cfg(), interrupt_at(7))
    assert steps_of(tmp_path) == [7], "Ctrl-C at step 7 left no checkpoint at step 7"
    seen = []
    result = train(tmp_path, cfg(), callback=lambda s, m: seen.append(s))
    assert seen == list(range(8, STEPS + 1)), f"the rerun did steps {seen}, expected 8..12"
    assert_same_state(final_state(tmp_path), uninterrupted["state"])
    assert metrics_rows(tmp_path) == uninterrupted["rows"]
    assert result.metrics == pytest.approx(uninterrupted["metrics"])
    assert steps_of(tmp_path) == [7, STEPS]  # the step-7 checkpoint is never the best one
    mngr = ckpt_lib.make_manager(os.path.join(tmp_path, "ckpt"), read_only=True,
                                 best_metric="train_loss")
    assert mngr.best_step() == STEPS
    mngr.close()


def test_the_first_sigint_stops_after_the_step_with_a_checkpoint(tmp_path, capsys):
    """A real SIGINT in the middle of step 5 (here: from its callback): the step ends, a
    checkpoint is saved at step 5 and only then KeyboardInterrupt propagates; the rerun resumes
    at step 6."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    seen = []

    def sigint_at_5(s, metrics):
        seen.append(s)
        if s == 5:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, cfg(), sigint_at_5)
    assert seen == [1, 2, 3, 4, 5]
    assert steps_of(tmp_path) == [5]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "handler not restored"
    err = capsys.readouterr().err
    assert "Ctrl-C: saving a checkpoint after this step" in err
    assert "checkpoint saved at step 5 of 12" in err
    seen.clear()
    train(tmp_path, cfg(num_steps=STEPS), callback=lambda s, m: seen.append(s))
    assert seen[0] == 6


def test_a_second_ctrl_c_during_that_save_leaves_the_checkpoints_usable(tmp_path, monkeypatch,
                                                                        uninterrupted):
    """Orbax writes a step into a temporary directory and renames it when complete: a second
    Ctrl-C during the step-7 save (here: right before the rename) leaves no step-7 checkpoint, the
    step-4 one intact, and a rerun resumes from step 4 (the leftover temporary directory
    deleted) to the uninterrupted run's final state."""
    from orbax.checkpoint._src.path import atomicity

    finalize = atomicity.AtomicRenameTemporaryPath.finalize
    cut = []

    async def second_ctrl_c(self):
        if self.get().name.startswith("7."):
            cut.append(self.get().name)
            raise KeyboardInterrupt
        return await finalize(self)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", second_ctrl_c)
    config = cfg(save_every=4, async_checkpoint=False)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, config, interrupt_at(7))
    assert cut, "no checkpoint save was started on Ctrl-C at step 7"
    monkeypatch.undo()
    assert steps_of(tmp_path) == [4]
    leftovers = [n for n in os.listdir(tmp_path / "ckpt") if n.startswith("7")]
    assert leftovers and not os.path.exists(tmp_path / "ckpt" / "7"), leftovers

    seen = []
    train(tmp_path, config, callback=lambda s, m: seen.append(s))
    assert seen == list(range(5, STEPS + 1))
    assert [n for n in os.listdir(tmp_path / "ckpt") if "tmp" in n] == []
    assert_same_state(final_state(tmp_path), uninterrupted["state"])


def test_a_restart_from_step_0_drops_the_rows_of_abandoned_attempts(tmp_path, uninterrupted):
    """Two crashes before any checkpoint (no checkpoint on a crash, only on Ctrl-C): the rerun
    starts at step 0 and metrics.jsonl holds its rows only, once each (the trial found
    ``"step": 90`` three times after two restarts)."""
    class Crash(Exception):
        pass

    def crash_at(step):
        def callback(s, metrics):
            if s == step:
                raise Crash
        return callback

    for step in (5, 9):
        with pytest.raises(Crash):
            train(tmp_path, cfg(), crash_at(step))
    assert steps_of(tmp_path) == []
    train(tmp_path, cfg())
    rows = metrics_rows(tmp_path)
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12], rows
    assert rows == uninterrupted["rows"]


def test_the_progress_bar_line_comes_before_the_interrupt_message(tmp_path, capsys):
    """With the progress bar on, the last line on stderr is the interrupt message of
    resume_hint_on_interrupt, not a bar line written when the bar is garbage collected."""
    from jaxgrad.pipeline.runtime import resume_hint_on_interrupt

    with pytest.raises(SystemExit) as exit_info:
        with resume_hint_on_interrupt():
            train(tmp_path, cfg(progress=True), interrupt_at(3))
    assert exit_info.value.code == 130
    del exit_info
    gc.collect()  # an unclosed bar prints its last line when it is collected
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("[jaxgrad] interrupted"), lines[-3:]
