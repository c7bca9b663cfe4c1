"""Orbax checkpoints of a training run: what is saved, what is kept, how it is restored.

One checkpoint per saved step, ``<ckpt_dir>/<step>/`` with four items:

- ``params``: the trainable state (the LoRA adapters, or every parameter in full fine-tuning), an
  ``nnx.State`` saved with ``StandardSave`` (sharded arrays are written shard by shard and
  restored straight into the target sharding);
- ``opt_state``: the optax state (same layout as the params plus counters);
- ``train_state``: ``step`` and the base ``rng`` key data (per-step keys are ``fold_in(rng,
  step)``, so the base key is all a resumed run needs);
- ``meta`` (JSON): the data position (``epoch``, ``step_in_epoch``), the metrics of the step, the
  trainable filter (``lora`` or ``full``) and the training config.

Orbax also records the step's metrics (``mngr.save(metrics=...)``). Retention keeps the latest
``keep`` steps (resume always finds the latest) *and* the best step by ``best_metric``
(``AnyPreservationPolicy(LatestN, BestN)``; orbax's ``best_fn`` + ``max_to_keep`` alone would
delete the latest step when it is not among the best). A checkpoint saved on Ctrl-C
(:func:`deferred_interrupt`, ``jaxgrad.train.loop``) has no metrics (its step was not evaluated):
it is never the best, and is kept only while it is among the latest ``keep``.

A save is atomic: orbax writes ``<step>.orbax-checkpoint-tmp-*`` and renames it to ``<step>`` when
every item is written, so a save cut short (a second Ctrl-C, a crash) leaves the earlier steps as
they were and no ``<step>`` directory; managers opened for writing delete such leftovers.

:func:`restore_params` loads the trained parameters of a checkpoint into a model in a fresh
process, without optimizer state: what evaluation and the gradient stage need.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers as ocm

from jaxgrad.common.jsonio import jsonable
from jaxgrad.models.lora import TRAINABLE_FILTERS, has_adapters, trainable_state

ITEMS = ("params", "opt_state", "train_state", "meta")


def make_manager(directory: str | os.PathLike, *, keep: int = 2, best_metric: str | None = None,
                 best_mode: str = "min", async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
    """A CheckpointManager keeping the latest ``keep`` steps plus the best by ``best_metric``.

    Raises:
      ValueError: ``keep`` < 1 or ``best_mode`` not ``"min"``/``"max"``.
    """
    if int(keep) < 1:
        raise ValueError(f"keep (keep_checkpoints) must be >= 1, got {keep!r}")
    if best_mode not in ("min", "max"):
        raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    policies: list[Any] = [ocm.LatestN(n=int(keep))]
    best_fn = None
    if best_metric:
        best_fn = lambda metrics: float(metrics[best_metric])  # noqa: E731
        # A step saved without metrics (on Ctrl-C) is not kept for being unranked.
        policies.append(ocm.BestN(get_metric_fn=best_fn, reverse=(best_mode == "min"), n=1,
                                  keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn, best_mode=best_mode,
        preservation_policy=ocm.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, read_only=read_only, create=not read_only,
        cleanup_tmp_directories=not read_only,  # what a save cut short left behind
        # read-only: no saves (orbax warns that it sets this itself otherwise)
        **({"save_interval_steps": 0} if read_only else {}))
    with _quiet("is read only", read_only):
        return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), item_names=ITEMS,
                                     options=options)


class _DropNotice(logging.Filter):
    """Drops the log records holding ``text``: orbax warns "Given directory is read only" whenever
    a manager is opened read-only, which is how jaxgrad restores θ* (several times a run), and
    "did not provide metrics" for a step saved on Ctrl-C: both expected, so not shown."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def _quiet(text: str, on: bool = True):
    if not on:
        yield
        return
    notice = _DropNotice(text)
    loggers = [logging.getLogger("absl"), logging.getLogger()]
    for lg in loggers:
        lg.addFilter(notice)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(notice)


def save(mngr: ocp.CheckpointManager, step: int, *, params: Any, opt_state: Any,
         train_state: Mapping[str, Any], meta: Mapping[str, Any],
         metrics: Mapping[str, float] | None = None) -> bool:
    """Save one step (asynchronously when the manager is async); True when a save started.
    ``metrics`` None: a step that is not ranked for the best checkpoint (saved on Ctrl-C)."""
    with _quiet("did not provide metrics", metrics is None):
        return mngr.save(
            int(step),
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                train_state=ocp.args.StandardSave(dict(train_state)),
                meta=ocp.args.JsonSave(jsonable(meta))),
            metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()},
            force=True)


class InterruptRequest:
    """Whether Ctrl-C was pressed inside :func:`deferred_interrupt` (``requested``)."""

    requested: bool = False


@contextlib.contextmanager
def deferred_interrupt(enabled: bool = True, notice: str = ""):
    """Turn the first Ctrl-C (SIGINT) into a request the training loop honours between steps.

    A ``KeyboardInterrupt`` raised at an arbitrary point of a step (say, when the jitted step
    returns, its inputs donated, its outputs not yet assigned) leaves no consistent state to
    save. Inside this context the first SIGINT only sets ``requested`` (and prints ``notice``);
    the loop saves a checkpoint at the end of the step and raises ``KeyboardInterrupt`` itself.
    A second Ctrl-C raises at once (Python's default handler is back). When the body ends with a
    request still pending, ``KeyboardInterrupt`` is raised on leaving.

    Does nothing (``requested`` stays False, Ctrl-C raises as usual) when ``enabled`` is False,
    outside the main thread (signal handlers can only be set there), or when SIGINT already has
    a handler other than Python's default (the program handles Ctrl-C itself).
    """
    request = InterruptRequest()
    if not (enabled and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        yield request
        return

    def handler(signum, frame):
        request.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: at once
        if notice:
            print(f"\n{notice}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, handler)
    try:
        yield request
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if request.requested:
        raise KeyboardInterrupt


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs for ``tree`` carrying ``shardings`` (a matching tree, or None)."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                                           sharding=getattr(x, "sharding", None)),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                        tree, shardings)


def restore(mngr: ocp.CheckpointManager, step: int, *, params: Any, opt_state: Any,
            train_state: Any) -> dict[str, Any]:
    """Restore every item of ``step`` into the given abstract trees (``abstract_like``)."""
    return mngr.restore(int(step), args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params),
        opt_state=ocp.args.StandardRestore(opt_state),
        train_state=ocp.args.StandardRestore(train_state),
        meta=ocp.args.JsonRestore()))


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    """The JSON ``meta`` item of ``step``."""
    out = mngr.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])


def resolve_step(mngr: ocp.CheckpointManager, step: int | str | None) -> int:
    """``None``/``"latest"`` -> latest step, ``"best"`` -> best step, an int -> itself (checked)."""
    steps = list(mngr.all_steps())
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {mngr.directory}")
    if step is None or step == "latest":
        return int(mngr.latest_step())
    if step == "best":
        return int(mngr.best_step())
    if isinstance(step, str) and step.isdigit():
        step = int(step)
    if not isinstance(step, (int, np.integer)) or int(step) not in steps:
        raise ValueError(f"checkpoint step {step!r} is not available in {mngr.directory}; "
                         f"steps: {sorted(steps)} (or 'latest' / 'best')")
    return int(step)


def restore_params(model: nnx.Module, directory: str | os.PathLike,
                   step: int | str | None = None) -> tuple[nnx.Module, dict]:
    """Load the trained parameters of a checkpoint into ``model`` (in place); returns (model, meta).

    ``model`` must have the structure the run trained (same architecture; the same LoRA adapters
    in LoRA mode). Arrays are restored with the shardings of the model's current arrays.

    Args:
      model: the model to fill.
      directory: the checkpoint directory (``<run>/meta_train/ckpt``).
      step: a step number, ``"latest"`` (default) or ``"best"``.
    """
    mngr = make_manager(directory, read_only=True, async_save=False)
    try:
        step = resolve_step(mngr, step)
        meta = read_meta(mngr, step)
        trainable = meta.get("trainable", "lora")
        if trainable not in TRAINABLE_FILTERS:
            raise ValueError(f"{directory}/{step}: unknown trainable filter {trainable!r}")
        if trainable == "lora" and not has_adapters(model):
            raise ValueError(f"restore_params: the model has no {trainable!r} parameters; the "
                             "checkpoint holds LoRA adapters: apply_lora with the run's "
                             "LoraConfig first")
        target = trainable_state(model, full_finetune=trainable == "full")
        restored = mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_like(target))))["params"]
    finally:
        mngr.close()
    nnx.update(model, restored)
    return model, meta
