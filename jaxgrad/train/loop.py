"""The training loop: :func:`run_training` over :class:`~jaxgrad.train.batches.Batches`, and
:func:`fit` over example dicts.

:func:`run_training` is set-up (:func:`_setup`: checks, the trainable/frozen split on the mesh,
the optimizer), restore (:func:`_restore`), the step loop (:func:`_step_loop`: log rows,
evaluations, checkpoints on their schedules) and checkpointing (:func:`_save_checkpoint`).
Checkpoints (:mod:`jaxgrad.train.checkpoint`) hold the trainable state, optimizer state, base
RNG key, step and data position; a run restarted in the same directory resumes from the latest
checkpoint and ends in the same state as an uninterrupted run (the data order is a function of
``(seed, epoch)`` and step keys are ``fold_in(rng, step)``; each checkpoint also holds the
loss averages in progress, so the resumed run logs the same rows). Ctrl-C saves a checkpoint
at the step it stops at (:func:`_save_on_interrupt`) before the ``KeyboardInterrupt`` goes on, so
a rerun resumes there rather than at the last scheduled checkpoint. Progress goes to a tqdm bar
and to ``metrics.jsonl`` (one JSON object per logged step or evaluation: on a (re)start at step
``s``, the rows past ``s`` of abandoned attempts are dropped).

Multi-host: each process reads its own rows of every global batch (``process_index`` /
``process_count`` in the batch iterator) and :func:`jaxgrad.common.sharding.shard_batch`
assembles global arrays with ``jax.make_array_from_process_local_data``. Only process 0 writes
logs and adapters; all processes take part in checkpointing (orbax coordinates). A checkpoint on
Ctrl-C is saved by single-process runs only: SIGINT reaches the processes of a multi-host run
separately (or only one of them), and a save that not every process joins would hang.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxgrad import rundir
from jaxgrad.common import sharding as sharding_lib
from jaxgrad.common.jsonio import jsonable
from jaxgrad.common.progress import progress_bar
from jaxgrad.config import TrainConfig
from jaxgrad.models.forward import model_layout
from jaxgrad.models.lora import has_adapters, split_trainable, trainable_kind
from jaxgrad.models.peft import save_peft_adapter
from jaxgrad.train import checkpoint as ckpt_lib
from jaxgrad.train.batches import Batches, example_batches
from jaxgrad.train.evaluate import Evaluator, make_evaluator
from jaxgrad.train.optim import make_optimizer, make_schedule
from jaxgrad.train.step import train_step

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    """What :func:`run_training` returns.

    Attributes:
      model: the model, its trainable parameters set to the final values.
      step: optimizer steps done (equal to the total unless stopped by ``stop_after_steps``).
      metrics: the last evaluation's metrics plus ``train_loss`` (mean since the last log).
      best_step: the best checkpoint by ``best_metric`` (None without checkpoints).
      workdir: the run directory.
    """

    model: nnx.Module
    step: int
    metrics: dict[str, float]
    best_step: int | None
    workdir: str


class MetricsLog:
    """Append-only ``metrics.jsonl``, written by process 0 only."""

    def __init__(self, path: str):
        self.path = path
        self.enabled = jax.process_index() == 0

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` (a resumed run redoes those steps and logs them again)."""
        if not (self.enabled and os.path.isfile(self.path)):
            return
        with open(self.path) as f:
            rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(rows)

    def write(self, row: Mapping[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(jsonable(row)) + "\n")


def _opt_shardings(tx, abstract_opt_state, param_shardings, mesh):
    return optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt_state, param_shardings,
        transform_non_params=lambda _: sharding_lib.replicated(mesh),
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


@dataclasses.dataclass
class _Run:
    """What one call of :func:`run_training` carries from set-up to the end of its step loop:
    the split model's states, the optimizer, the shardings, the position, and the loop's
    metric bookkeeping."""

    cfg: TrainConfig
    workdir: str
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    trainable: nnx.State
    frozen: nnx.State
    opt_state: Any
    rng_data: jax.Array
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    shardings: dict[str, Any]  # "trainable", "frozen", "opt", "repl"
    spe: int  # steps per epoch
    total: int  # steps of the whole run
    kind: str  # what is trained: "lora" or "full" (recorded in each checkpoint's meta)
    step: int = 0
    pending: list = dataclasses.field(default_factory=list)  # device metrics not fetched yet
    unlogged: list = dataclasses.field(default_factory=list)  # host metrics since the last log row
    since_save: list = dataclasses.field(default_factory=list)  # host losses since the last save
    train_loss: float = float("nan")
    last_eval: dict = dataclasses.field(default_factory=dict)
    saved: int = 0  # the step of the last checkpoint saved or restored (0: nothing to save)
    phase: str = ""  # "step" / "save" while the state is in flux (no checkpoint on Ctrl-C then)

    def fetch(self) -> None:
        """Bring the pending device metrics to the host."""
        host = jax.device_get(self.pending)
        self.pending = []
        self.unlogged.extend(host)
        self.since_save.extend(float(h["loss"]) for h in host)


def _setup(model: nnx.Module, train: Batches, cfg: TrainConfig, workdir: str,
           mesh: jax.sharding.Mesh | None) -> _Run:
    """Checks, the trainable/frozen split placed on the mesh, the optimizer and its state."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig (use TrainConfig.from_config), got "
                        f"{type(cfg).__name__}")
    mesh = mesh or sharding_lib.make_mesh(cfg.mesh.data, cfg.mesh.model)
    data_size = mesh.shape[sharding_lib.DATA_AXIS]
    if cfg.batch_size % (cfg.grad_accum_steps * data_size):
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by grad_accum_steps="
                         f"{cfg.grad_accum_steps} x data axis size {data_size}")
    if train.steps_per_epoch < 1:
        raise ValueError(f"train.steps_per_epoch must be >= 1, got {train.steps_per_epoch}")
    os.makedirs(workdir, exist_ok=True)
    spe = int(train.steps_per_epoch)
    total = cfg.total_steps(spe)
    rules = sharding_lib.rules_from_config(cfg.mesh.rules)

    graphdef, trainable, frozen = split_trainable(model, cfg.full_finetune)
    trainable_sh = sharding_lib.state_shardings(trainable, mesh, rules, fsdp=cfg.mesh.fsdp)
    frozen_sh = sharding_lib.state_shardings(frozen, mesh, rules, fsdp=cfg.mesh.fsdp)
    # A jitted copy: fresh buffers, so donating them never invalidates the caller's model.
    trainable = sharding_lib.place(trainable, trainable_sh)
    trainable = jax.jit(lambda t: jax.tree.map(jnp.copy, t), in_shardings=(trainable_sh,),
                        out_shardings=trainable_sh)(trainable)
    frozen = sharding_lib.place(frozen, frozen_sh)
    tx = make_optimizer(cfg, total)
    opt_sh = _opt_shardings(tx, jax.eval_shape(tx.init, trainable), trainable_sh, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
    repl = sharding_lib.replicated(mesh)
    rng_data = sharding_lib.from_host(jax.random.key_data(jax.random.key(cfg.seed)), repl)
    return _Run(cfg=cfg, workdir=workdir, mesh=mesh, graphdef=graphdef, trainable=trainable,
                frozen=frozen, opt_state=opt_state, rng_data=rng_data, tx=tx,
                schedule=make_schedule(cfg, total),
                shardings={"trainable": trainable_sh, "frozen": frozen_sh, "opt": opt_sh,
                           "repl": repl},
                spe=spe, total=total, kind=trainable_kind(cfg.full_finetune))


def _best_metric(cfg: TrainConfig, evaluator: Evaluator | None) -> str:
    """The metric the best checkpoint is chosen by (``train_loss`` without an evaluator)."""
    best_metric = cfg.best_metric if evaluator is not None else "train_loss"
    if evaluator is not None and "_acc" in best_metric and not evaluator.max_new_tokens:
        raise ValueError(f"best_metric {best_metric!r} needs generation: set max_new_tokens > 0 "
                         "or choose a loss metric")
    return best_metric


def _restore(run: _Run, mngr, metrics_log: MetricsLog) -> dict[str, float]:
    """Resume from the latest checkpoint of ``mngr``, if any (into ``run``); the metrics saved
    with it (empty when there is none)."""
    latest = mngr.latest_step()
    if latest is None:
        metrics_log.truncate_after(0)  # rows of attempts that stopped before any checkpoint
        return {}
    workdir, sh, repl = run.workdir, run.shardings, run.shardings["repl"]
    meta = ckpt_lib.read_meta(mngr, latest)
    resumed_metrics = dict(meta.get("metrics") or {})
    if meta.get("trainable") != run.kind:
        raise ValueError(f"{workdir}: checkpoint {latest} trained "
                         f"{meta.get('trainable')!r} parameters, this run trains "
                         f"{run.kind!r}; use a new workdir")
    if meta.get("steps_per_epoch") != run.spe:
        raise ValueError(f"{workdir}: checkpoint {latest} was written with "
                         f"{meta.get('steps_per_epoch')} steps per epoch, the data now "
                         f"gives {run.spe}: the data or batch size changed; use a new workdir")
    train_state = {"rng": run.rng_data, "step": jnp.zeros((), jnp.int32)}
    restored = ckpt_lib.restore(
        mngr, latest, params=ckpt_lib.abstract_like(run.trainable, sh["trainable"]),
        opt_state=ckpt_lib.abstract_like(run.opt_state, sh["opt"]),
        train_state=ckpt_lib.abstract_like(train_state, {"rng": repl, "step": repl}))
    run.trainable, run.opt_state = restored["params"], restored["opt_state"]
    run.rng_data = restored["train_state"]["rng"]
    run.step = run.saved = int(restored["train_state"]["step"])
    if run.step != latest:
        raise ValueError(f"{workdir}: checkpoint {latest} holds step {run.step}")
    loop = meta.get("loop") or {}  # checkpoints from before it was saved: the averages restart
    run.unlogged = [dict(h) for h in loop.get("unlogged", [])]
    run.since_save = [float(x) for x in loop.get("since_save", [])]
    run.last_eval = dict(loop.get("last_eval", {}))
    run.train_loss = float(loop.get("train_loss", float("nan")))
    metrics_log.truncate_after(run.step)
    log.info("resumed from %s at step %d (epoch %d, step %d of the epoch)", workdir, run.step,
             run.step // run.spe, run.step % run.spe)
    return resumed_metrics


def _compile_step(run: _Run):
    """:func:`train_step` jitted with the run's shardings, donating trainable and optimizer."""
    sh = run.shardings
    return jax.jit(
        functools.partial(train_step, run.graphdef, tx=run.tx,
                          grad_accum_steps=run.cfg.grad_accum_steps),
        in_shardings=(sh["trainable"], sh["frozen"], sh["opt"],
                      sharding_lib.batch_sharding(run.mesh), sh["repl"]),
        out_shardings=(sh["trainable"], sh["opt"], sh["repl"]),
        donate_argnums=(0, 2))


def _due(every: int, step: int, spe: int) -> bool:
    """Whether ``step`` is on an ``every``-steps schedule (``every <= 0``: once per epoch)."""
    return (step % every == 0) if every > 0 else (step % spe == 0)


def _log_train(run: _Run, metrics_log: MetricsLog, bar, t0: float) -> None:
    """A ``metrics.jsonl`` row: the mean train loss and gradient norm since the last row."""
    run.fetch()
    run.train_loss = float(np.mean([float(h["loss"]) for h in run.unlogged]))
    metrics_log.write({
        "step": run.step, "epoch": run.step / run.spe, "train_loss": run.train_loss,
        "grad_norm": float(np.mean([float(h["grad_norm"]) for h in run.unlogged])),
        "learning_rate": float(run.schedule(run.step - 1)),
        "seconds": round(time.time() - t0, 3)})
    run.unlogged.clear()
    if bar is not None:
        bar.set_postfix(loss=f"{run.train_loss:.4f}", refresh=False)  # drawn by update()


def _evaluate(run: _Run, evaluator: Evaluator, metrics_log: MetricsLog) -> None:
    run.last_eval = evaluator(nnx.merge(run.graphdef, run.trainable, run.frozen), run.mesh)
    metrics_log.write({"step": run.step, "epoch": run.step / run.spe, **run.last_eval})
    log.info("step %d: %s", run.step, _short(run.last_eval))


def _save_checkpoint(run: _Run, mngr, best_metric: str, interrupted: bool = False) -> None:
    """Save the run's state at its step, with the metrics since the last save and the last
    evaluation's (the best checkpoint is chosen by ``best_metric`` among them; a checkpoint
    saved on Ctrl-C, ``interrupted``, is not ranked: its step was not evaluated) and the loop's
    averages in progress (``meta["loop"]``: the resumed run continues them)."""
    run.fetch()
    metrics = {"train_loss": float(np.mean(run.since_save)), **run.last_eval}
    if best_metric not in metrics and not interrupted:
        raise ValueError(f"best_metric {best_metric!r} is not among the metrics "
                         f"{sorted(metrics)}")
    step, spe = run.step, run.spe
    loop = {"unlogged": [{k: float(v) for k, v in h.items()} for h in run.unlogged],
            "since_save": list(run.since_save) if interrupted else [],
            "last_eval": run.last_eval, "train_loss": run.train_loss}
    ckpt_lib.save(mngr, step, params=run.trainable, opt_state=run.opt_state,
                  train_state={"rng": run.rng_data,  # global arrays (multi-host)
                               "step": sharding_lib.from_host(
                                   np.asarray(step, np.int32), run.shardings["repl"])},
                  meta={"step": step, "epoch": step // spe,
                        "step_in_epoch": step % spe, "steps_per_epoch": spe,
                        "trainable": run.kind, "metrics": metrics, "loop": loop,
                        "interrupted": interrupted, "config": dataclasses.asdict(run.cfg)},
                  metrics=None if interrupted else metrics)
    if not interrupted:
        run.since_save.clear()


def _save_on_interrupt(run: _Run, mngr, best_metric: str, stop_at: int) -> None:
    """On Ctrl-C: save a checkpoint at the run's step, unless one is there already, the state is
    mid-step or mid-save (then the last checkpoint stays the resume point), the step is the
    last (its evaluation and checkpoint are the run's result: the rerun redoes them from the
    last checkpoint) or other processes run too (they would not join the save)."""
    if (run.phase or run.step == run.saved or run.step >= stop_at
            or jax.process_count() > 1):
        return
    try:
        _save_checkpoint(run, mngr, best_metric, interrupted=True)
        mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - the interrupt goes on whatever the save did
        log.warning("could not save a checkpoint at step %d on Ctrl-C: %s", run.step, e)
        return
    run.saved = run.step
    if jax.process_index() == 0:
        print(f"[jaxgrad] {run.workdir}: checkpoint saved at step {run.step} of {run.total}",
              file=sys.stderr, flush=True)


def _step_loop(run: _Run, train: Batches, step_fn, mngr, metrics_log: MetricsLog,
               evaluator: Evaluator | None, best_metric: str,
               callback: Callable[[int, dict], None] | None, save_on_interrupt: bool) -> None:
    """Steps from ``run.step`` to the last (or ``stop_after_steps``), logging, evaluating and
    saving checkpoints on their schedules; on Ctrl-C a checkpoint at the step reached
    (:func:`_save_on_interrupt`; the first Ctrl-C is honoured between steps,
    :func:`~jaxgrad.train.checkpoint.deferred_interrupt`). The progress bar is closed whatever
    happens, so that no bar line follows what the caller prints about an interruption."""
    cfg = run.cfg
    stop_at = min(run.total, cfg.stop_after_steps) if cfg.stop_after_steps else run.total
    bar = None
    if cfg.progress and jax.process_index() == 0:
        bar = progress_bar(total=run.total, initial=run.step,
                           desc=os.path.basename(os.path.normpath(run.workdir)),
                           dynamic_ncols=True)
    save_on_interrupt = save_on_interrupt and jax.process_count() == 1
    try:
        with ckpt_lib.deferred_interrupt(
                save_on_interrupt, notice="[jaxgrad] Ctrl-C: saving a checkpoint after this step "
                "(Ctrl-C again stops at once)") as interrupt:
            _steps(run, train, step_fn, mngr, metrics_log, evaluator, best_metric, callback,
                   stop_at, interrupt, bar)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        if save_on_interrupt:
            _save_on_interrupt(run, mngr, best_metric, stop_at)
        raise
    finally:
        if bar is not None:
            bar.close()


def _steps(run: _Run, train: Batches, step_fn, mngr, metrics_log: MetricsLog,
           evaluator: Evaluator | None, best_metric: str,
           callback: Callable[[int, dict], None] | None, stop_at: int,
           interrupt: ckpt_lib.InterruptRequest, bar) -> None:
    """The step loop of :func:`_step_loop`; ``interrupt.requested`` stops it after a step."""
    cfg, spe = run.cfg, run.spe
    rng = jax.random.wrap_key_data(run.rng_data)
    t0 = time.time()
    while run.step < stop_at:
        epoch, start = divmod(run.step, spe)
        before = run.step
        for batch in train.iterate(epoch, start):
            batch = sharding_lib.shard_batch(dict(batch), run.mesh)
            run.phase = "step"  # donated inputs, outputs not yet assigned: nothing to save
            run.trainable, run.opt_state, m = step_fn(run.trainable, run.frozen, run.opt_state,
                                                      batch, jax.random.fold_in(rng, run.step))
            run.step += 1
            run.phase = ""
            run.pending.append(m)
            if callback is not None:
                callback(run.step, m)
            if bar is not None:
                bar.update(1)
            final = run.step == stop_at
            if run.step % cfg.log_every == 0 or final:
                _log_train(run, metrics_log, bar, t0)
            save_now = _due(cfg.save_every, run.step, spe) or final
            if evaluator is not None and (_due(cfg.eval_every, run.step, spe) or save_now):
                _evaluate(run, evaluator, metrics_log)
            if save_now and run.step != run.saved:
                run.phase = "save"
                _save_checkpoint(run, mngr, best_metric)
                run.phase = ""
                run.saved = run.step
            if final:
                break
            if interrupt.requested:
                raise KeyboardInterrupt
        if run.step == before:
            raise RuntimeError(f"train.iterate({epoch}, {start}) yielded no batch although "
                               f"{spe} steps per epoch were announced")


def run_training(model: nnx.Module, train: Batches, cfg: TrainConfig, workdir: str, *,
                 evaluator: Evaluator | None = None, mesh: jax.sharding.Mesh | None = None,
                 callback: Callable[[int, dict], None] | None = None,
                 save_on_interrupt: bool = True) -> TrainResult:
    """Train ``model`` on ``train`` batches; resume from ``workdir`` if it holds checkpoints.

    Args:
      model: an NNX model; LoRA mode needs adapters on it. Updated in place at the end.
      train: training batches (each ``batch_size / process_count`` rows on this process).
      cfg: the training config.
      workdir: run directory: ``ckpt/<step>/``, ``metrics.jsonl``.
      evaluator: validation metrics, run every ``eval_every`` steps, at every checkpoint (so each
        checkpoint carries its own metrics for best-checkpoint tracking) and at the end.
      mesh: device mesh (default :func:`jaxgrad.common.sharding.make_mesh` from ``cfg.mesh``).
      callback: ``callback(step, metrics)`` after every step; ``metrics`` are device scalars
        (reading them synchronizes). An exception raised in it stops training (the checkpoints
        written so far stay, as after a crash; a ``KeyboardInterrupt`` is a Ctrl-C).
      save_on_interrupt: on Ctrl-C (``KeyboardInterrupt``), save a checkpoint at the step
        reached before it propagates (single-process runs; not at the last step), so that a
        rerun resumes there. False: a rerun resumes from the last scheduled checkpoint.

    Returns:
      A :class:`TrainResult`.

    Raises:
      ValueError: inconsistent batch size / mesh / accumulation, a checkpoint from a different
        run layout, or a ``best_metric`` the evaluator does not produce.
    """
    run = _setup(model, train, cfg, workdir, mesh)
    best_metric = _best_metric(cfg, evaluator)
    mngr = ckpt_lib.make_manager(os.path.join(workdir, rundir.CKPT_DIR), keep=cfg.keep_checkpoints,
                                 best_metric=best_metric, best_mode=cfg.best_mode,
                                 async_save=cfg.async_checkpoint)
    metrics_log = MetricsLog(os.path.join(workdir, rundir.METRICS_FILE))
    try:
        resumed_metrics = _restore(run, mngr, metrics_log)
        start_step = run.step
        _step_loop(run, train, _compile_step(run), mngr, metrics_log, evaluator, best_metric,
                   callback, save_on_interrupt)
        mngr.wait_until_finished()
        best = mngr.best_step()
    finally:
        mngr.close()
    nnx.update(model, run.trainable, run.frozen)
    metrics = {"train_loss": run.train_loss, **run.last_eval}
    if run.step == start_step and resumed_metrics:  # resumed at the end: nothing ran, report the
        metrics = resumed_metrics                    # metrics saved with that checkpoint
    return TrainResult(model=model, step=run.step, metrics=metrics, best_step=best,
                       workdir=workdir)


def _short(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "/" not in k)



def fit(model: nnx.Module, tokenizer: Any, train_examples: Sequence[Mapping[str, Any]],
        cfg: TrainConfig, workdir: str, *,
        val_examples: Sequence[Mapping[str, Any]] | None = None,
        sources: Sequence[str] | None = None,
        extract_answer: Callable[[str], str | None] | None = None,
        mesh: jax.sharding.Mesh | None = None,
        callback: Callable[[int, dict], None] | None = None,
        save_on_interrupt: bool = True) -> TrainResult:
    """:func:`run_training` on example dicts (``example_id, source, prompt, completion, answer``).

    Args:
      model: the model (with LoRA adapters unless ``cfg.full_finetune``).
      tokenizer: a Hugging Face tokenizer with an eos token.
      train_examples: training examples, shuffled per epoch with ``cfg.seed``.
      cfg: the training config.
      workdir: the run directory.
      val_examples: validation examples (loss per source; accuracy when ``cfg.max_new_tokens``).
      sources: source names in the order metrics should index them (default: sorted names).
      extract_answer: answer extractor for accuracy (default :func:`default_extract_answer`).
      mesh: device mesh (default from ``cfg.mesh``).
      callback, save_on_interrupt: see :func:`run_training`.
    """
    arch, start = model_layout(model)
    enc_dec = arch == "encoder_decoder"
    every = list(train_examples) + list(val_examples or [])
    sources = list(sources) if sources is not None else sorted({e["source"] for e in every})
    train = example_batches(train_examples, tokenizer, batch_size=cfg.batch_size,
                            max_length=cfg.max_length, shuffle=True, seed=cfg.seed,
                            encoder_decoder=enc_dec, sources=sources, decoder_start_id=start)
    evaluator = None
    if val_examples:
        evaluator = make_evaluator(model, tokenizer, val_examples, cfg, sources=sources,
                                   extract_answer=extract_answer)
    return run_training(model, train, cfg, workdir, evaluator=evaluator, mesh=mesh,
                        callback=callback, save_on_interrupt=save_on_interrupt)


def save_adapter(model: nnx.Module, workdir: str, *,
                 base_model_name_or_path: str | None = None) -> str | None:
    """Export the LoRA adapters as a PEFT adapter in ``<workdir>/adapter``, for peft's
    ``PeftModel.from_pretrained(torch_model, path)``.

    Args:
      model, workdir: the trained NNX model and the run directory.
      base_model_name_or_path: recorded in ``adapter_config.json``.

    Returns the adapter directory, or None (writing nothing) when the model has no adapters or on
    processes other than 0. Raises ValueError as :func:`save_peft_adapter`.
    """
    if jax.process_index() != 0 or not has_adapters(model):
        return None
    path = os.path.join(workdir, rundir.ADAPTER_DIR)
    save_peft_adapter(model, path, base_model_name_or_path=base_model_name_or_path)
    return path
