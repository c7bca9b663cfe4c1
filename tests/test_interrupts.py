"""Ctrl-C during training (new-user trial): a checkpoint at the step reached, a rerun that resumes
there and ends as an uninterrupted run does, a second Ctrl-C during that save that leaves the
checkpoints usable, ``metrics.jsonl`` holding the history of the run that produced the result only,
and the progress bar closed before anything is printed about the interruption.

The model is a from-scratch one-layer Llama with LoRA on two small synthetic sources (64 train
examples, batch 8: 8 steps per epoch), 12 steps: an interruption at step 7 resumes mid-epoch and
the run crosses an epoch boundary after it. ``save_every=100`` is the demo's situation (a
checkpoint only at the end), so without a checkpoint on Ctrl-C a rerun would start from step 0.
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

from jaxgrad.config import ModelSpec, TrainConfig
from jaxgrad.models import LoraConfig
from jaxgrad.models.loading import load_model
from jaxgrad.models.lora import split_trainable
from jaxgrad.train import checkpoint as ckpt_lib
from jaxgrad.train import fit, make_optimizer

STEPS = 12
LLAMA = dict(vocab_size=103, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def tiny_model():
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
    model, tok = tiny_model()
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
    model, _ = tiny_model()
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


def test_an_interrupted_stage_keeps_its_time_for_the_report(tmp_path, monkeypatch):
    """run_pipeline writes a timings.jsonl row for a stage stopped by Ctrl-C (its seconds, not
    reused, ``fresh`` and the fingerprint as a finished stage's row has them), so the report's
    Stages table adds them to the resumed run's: "(in 2 runs)"."""
    import time

    from configs import demo
    from jaxgrad import rundir
    from jaxgrad.pipeline import run as run_mod
    from jaxgrad.pipeline.timings import stage_seconds

    def interrupted_base(config, workdir):  # started writing its artefact, then Ctrl-C
        os.makedirs(os.path.join(workdir, rundir.BASE_DIR), exist_ok=True)
        time.sleep(0.3)
        raise KeyboardInterrupt

    def resumed_base(config, workdir):
        time.sleep(0.2)
        with open(os.path.join(workdir, rundir.BASE_MODEL_FILE), "w") as f:
            f.write("weights")
        return os.path.join(workdir, rundir.BASE_DIR)

    config, workdir = demo.get_config("tiny"), str(tmp_path / "run")
    monkeypatch.setattr(run_mod, "stage_base", interrupted_base)
    with pytest.raises(KeyboardInterrupt):
        run_mod.run_pipeline(config, workdir, ["base"])
    monkeypatch.setattr(run_mod, "stage_base", resumed_base)
    run_mod.run_pipeline(config, workdir, ["base"])
    with open(os.path.join(workdir, rundir.TIMINGS_FILE)) as f:
        rows = [json.loads(line) for line in f]
    assert [(r["stage"], r["reused"], r["fresh"]) for r in rows] == [
        ("base", False, True), ("base", False, False)], rows
    assert rows[0]["fingerprint"] == rows[1]["fingerprint"] is not None
    assert rows[0]["seconds"] >= 0.3
    seconds, runs = stage_seconds(rows)["base"]
    assert runs == 2 and seconds >= 0.5
