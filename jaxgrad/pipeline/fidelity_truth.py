"""The truth the fidelity stage compares the estimates with: θ* fine-tuned for real on subsets of
the estimates table (:class:`SubsetFineTunes`), each measured once at θ_S.

θ* is loaded once with its target outputs (:class:`ThetaStar`); each subset's fine-tune starts
from it under ``fidelity.*`` (:func:`train_config`: ``fidelity.steps`` steps of
``fidelity.optimizer`` at a constant ``fidelity.learning_rate``, a fresh optimizer) and its update
θ_S − θ*, per-sample outputs and answer-choice accuracy at θ_S are kept in
``<workdir>/fidelity/subset_<i>/truth.npz``; ``fidelity/settings.json`` (:func:`check_settings`)
guards against resuming runs made with other fine-tuning settings.

One step on one batch (``fidelity.steps = 1``, every example of the subset in the batch, no
LoRA dropout) is computed without training: that step's gradient is the token-mean over the
subset, ``ΣG_u / ΣT_u`` over its units u (G_u the gradient at θ* of unit u's summed token
cross-entropy, T_u its target-token count), so each unit's sum is computed once and every subset's
update is ``make_optimizer``'s step on that gradient, as ``fit`` would take it (equal up to float
rounding: ``tests/pipeline/test_fidelity.py``). The demo's 21 pairs of 7 sources then cost 7 passes over
the data instead of 21 fine-tunes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxgrad import rundir
from jaxgrad.common.flat import FlatSpec, flat_spec, flatten, tree_norm, unflatten
from jaxgrad.common.jsonio import read_json, write_json
from jaxgrad.config import FidelityConfig, TrainConfig
from jaxgrad.data.batching import collate
from jaxgrad.estimate.scorer import SurrogateScorer
from jaxgrad.estimate.target import target_outputs
from jaxgrad.groups.stage import pipeline_units
from jaxgrad.models.forward import encode_for_model
from jaxgrad.models.lora import trainable_filter
from jaxgrad.train.evaluate import choice_accuracy, target_choices
from jaxgrad.train.loop import fit
from jaxgrad.train.losses import batch_loss
from jaxgrad.train.optim import make_optimizer
from jaxgrad.train.stage import load_theta_star

# One-step fine-tunes on subsets that fit one batch are computed from per-unit gradient sums
# (SubsetFineTunes); False forces `fit` for every subset (the tests compare the two).
ONE_BATCH_SHORTCUT = True


@dataclasses.dataclass
class ThetaStar:
    """θ* of a run with its target outputs: where every fidelity fine-tune starts and how it is
    measured (also the point of the first-order test,
    :func:`jaxgrad.pipeline.fidelity.first_order_error`)."""

    model: Any  # at θ* (the fine-tunes move it and put θ* back)
    tokenizer: Any
    filt: Any  # the trainable parameters' filter
    graphdef: Any
    rest: Any
    theta: Any  # the trainable state at θ*
    spec: FlatSpec
    flat: np.ndarray  # θ* as one D-vector
    norm: float  # ‖θ*‖
    examples: list[dict]  # the target's validation examples
    f: Callable  # jitted per-sample outputs f(params) -> [J] on them

    def f_at(self, delta) -> np.ndarray:
        """Per-sample outputs f at θ* + delta (a D-vector)."""
        params = jax.tree_util.tree_map(lambda a, b: a + b, self.theta,
                                        unflatten(jnp.asarray(delta), self.spec))
        return np.asarray(self.f(params))

    def surrogate_scorer(self, config, workdir: str, data) -> SurrogateScorer:
        """The estimates stage's scorer of the run (its fits, projector and target store), on
        this θ*."""
        units = pipeline_units(config, workdir, data.sources)
        return SurrogateScorer(config, workdir, units.names,
                               theta_star=(self.model, self.tokenizer), data=data)


def load_theta_star_outputs(config, workdir: str, data) -> ThetaStar:
    """θ* of the run in ``workdir`` (:func:`jaxgrad.train.stage.load_theta_star`) and its jitted
    target outputs (:func:`jaxgrad.estimate.target.target_outputs`)."""
    model, tokenizer = load_theta_star(config, workdir)
    filt = trainable_filter(model, bool(config.train.full_finetune))
    graphdef, theta, rest = nnx.split(model, filt, ...)
    theta = jax.tree_util.tree_map(jnp.array, theta)
    examples, f = target_outputs(config, data, model, tokenizer, graphdef, rest)
    return ThetaStar(model, tokenizer, filt, graphdef, rest, theta, flat_spec(theta),
                     np.asarray(flatten(theta)), float(tree_norm(theta)), examples, f)


def train_config(config, fcfg: FidelityConfig) -> tuple[TrainConfig, dict]:
    """The fine-tunes' training settings (``fidelity.*`` over ``train.*``: a constant learning
    rate, a fresh optimizer, no evaluation or checkpoints between steps) and the part of them
    ``fidelity/settings.json`` records."""
    tc = TrainConfig.from_config(config.train, config.mesh)
    tc = TrainConfig(**{**tc.__dict__, "num_steps": int(fcfg.steps), "optimizer": fcfg.optimizer,
                        "learning_rate": float(fcfg.learning_rate), "warmup_steps": 0,
                        "schedule": "constant", "batch_size": int(fcfg.batch_size or tc.batch_size),
                        "grad_accum_steps": 1, "max_new_tokens": 0,
                        "max_grad_norm": (tc.max_grad_norm if float(fcfg.max_grad_norm) < 0
                                          else float(fcfg.max_grad_norm)), "progress": False,
                        "async_checkpoint": False, "eval_every": 0, "save_every": 0,
                        "best_metric": "train_loss", "stop_after_steps": 0})
    settings = {"steps": tc.num_steps, "learning_rate": tc.learning_rate, "optimizer": tc.optimizer,
                "batch_size": tc.batch_size, "max_grad_norm": tc.max_grad_norm, "seed": tc.seed}
    return tc, settings


def check_settings(out_dir: str, settings: dict) -> None:
    """Record the fine-tunes' settings in ``<out_dir>/settings.json``, or refuse when the ones
    recorded there differ (the subsets' runs and truth.npz were made with those)."""
    path = os.path.join(out_dir, rundir.FIDELITY_SETTINGS_FILE)
    if os.path.isfile(path):
        old = read_json(path)
        old.setdefault("seed", 0)  # written before the seed was recorded: made with train.seed 0
        if old != settings:
            raise ValueError(f"{out_dir} holds fine-tunes made with other fidelity settings "
                             f"({old} != {settings}); delete it to rerun")
        return
    write_json(path, settings)


def choice_accuracy_fn(config, data, tokenizer):
    """``model -> accuracy`` of the most likely answer on the target's validation examples
    (:func:`jaxgrad.train.evaluate.choice_accuracy`), or ``model -> nan`` when the target's
    answers are open-ended."""
    choices = target_choices(data)
    examples = data.target_examples()
    if choices is None:
        return lambda model: float("nan")
    return lambda model: choice_accuracy(model, tokenizer, examples, choices, sources=data.sources,
                                         max_length=int(config.train.max_length),
                                         batch_size=int(config.gradients.batch_size))[0]


class SubsetFineTunes:
    """θ* fine-tuned on each subset under the fidelity settings, measured once: the subset's
    ``truth.npz`` keeps the update θ_S − θ*, the per-sample outputs and the answer-choice accuracy
    at θ_S, reused while ``_key`` (what they depend on besides settings.json's) is unchanged."""

    def __init__(self, config, workdir: str, data, units, theta: ThetaStar, tc: TrainConfig,
                 accuracy: Callable):
        self.config, self.workdir, self.data, self.units = config, workdir, data, units
        self.theta, self.tc, self.accuracy = theta, tc, accuracy
        # fidelity.steps = 1 with LoRA dropout off: a subset whose examples fit one batch gets
        # the exact one-step update from per-unit gradient sums (fit's result up to rounding).
        self.one_batch = (ONE_BATCH_SHORTCUT and tc.num_steps == 1
                          and float(config.lora.get("dropout", 0.0)) == 0.0)
        self.unit_examples, self.gradient_sums = _unit_gradient_sums(
            config, data, units, theta.model, theta.tokenizer, theta.graphdef, theta.rest,
            theta.filt)
        self.one_step = _one_step_update(tc)

    def _key(self, row: dict) -> str:
        config = self.config
        return json.dumps({"sources": row["sources"], "theta_norm": round(self.theta.norm, 6),
                           "output_fn": str(config.gradients.output_fn),
                           "eps": float(config.gradients.eps),
                           "max_length": int(config.train.max_length),
                           "target_ids": [e.get("example_id") for e in self.theta.examples]},
                          sort_keys=True)

    def measure(self, row: dict) -> tuple:
        """``(f_true, u, accuracy, grad_norms)`` of the fine-tune on ``row``'s subset."""
        run_dir = rundir.fidelity_subset_dir(self.workdir, row["subset"])
        truth_path = os.path.join(run_dir, rundir.TRUTH_FILE)
        key = self._key(row)
        truth = np.load(truth_path) if os.path.isfile(truth_path) else None
        if truth is not None and str(truth["key"]) == key:
            return (truth["f_true"], truth["update"], float(truth["accuracy"]),
                    list(truth["grad_norms"]))
        f_true, u, acc_true, grad_norms = self._train(row["source_list"], run_dir)
        os.makedirs(run_dir, exist_ok=True)
        if jax.process_index() == 0:
            tmp = os.path.join(run_dir, f"truth.tmp{os.getpid()}.npz")
            np.savez(tmp, key=np.str_(key), f_true=f_true, update=u.astype(np.float32),
                     accuracy=np.float64(acc_true), grad_norms=np.asarray(grad_norms))
            os.replace(tmp, truth_path)
        return f_true, u, acc_true, grad_norms

    def _train(self, chosen: list[str], run_dir: str) -> tuple:
        theta, tc, model = self.theta, self.tc, self.theta.model
        nnx.update(model, theta.theta)
        train_examples = self.units.examples(self.data, "train", chosen)
        counts = [len(self.unit_examples(n)) for n in chosen]
        if self.one_batch and len(train_examples) <= tc.batch_size and sum(counts) == len(train_examples):
            # One step on one batch holding the whole subset: the same update as `fit`, from
            # the units' gradient sums (computed once per unit, not once per subset).
            theta_s, norm = self.one_step(theta.theta, [self.gradient_sums(n) for n in chosen])
            grad_norms = [norm]
            nnx.update(model, theta_s)
            trained = model
        else:
            grad_norms = []
            # No checkpoint on Ctrl-C: a resumed fine-tune would miss the grad norms of the
            # steps before it (these fine-tunes are a few steps long).
            trained = fit(model, theta.tokenizer, train_examples, tc, run_dir,
                          sources=self.data.sources, save_on_interrupt=False,
                          callback=lambda step, m: grad_norms.append(float(m["grad_norm"]))).model
            theta_s = nnx.state(trained, theta.filt)
        f_true = np.asarray(theta.f(theta_s))
        u = np.asarray(flatten(theta_s)) - theta.flat
        acc_true = self.accuracy(trained)
        nnx.update(model, theta.theta)
        return f_true, u, acc_true, grad_norms


def _unit_gradient_sums(config, data, units, model, tokenizer, graphdef, rest, filt):
    """``(unit_examples, gradient_sums)``: ``unit_examples(unit)``, the unit's train examples
    (cached), and ``gradient_sums(unit) -> (G, T)``, the gradient at θ* of the unit's summed
    training token cross-entropy (a trainable-state tree, float32) and its target-token count.

    One full-batch step on a union of units has the token-mean gradient ``ΣG / ΣT`` over its
    units, so the fidelity stage's one-step fine-tunes need one pass over each unit's examples
    instead of one per subset (see the module docstring). Results are cached per unit.
    """
    max_length, chunk = int(config.train.max_length), 256

    @jax.jit
    def sums(params, batch):
        # normalizer 1: the summed (not mean) token cross-entropy of the batch's valid rows
        grads = jax.grad(lambda p: batch_loss(nnx.merge(graphdef, p, rest), batch,
                                              normalizer=1.0))(params)
        valid = batch["valid"].astype(jnp.float32)
        return grads, jnp.sum(batch["target_mask"].astype(jnp.float32) * valid[:, None])

    params = nnx.state(model, filt)
    cache: dict[str, tuple] = {}
    unit_examples = functools.cache(lambda unit: units.examples(data, "train", [unit]))

    def gradient_sums(unit: str):
        if unit not in cache:
            examples = unit_examples(unit)
            enc, arch = encode_for_model(examples, tokenizer, model, sources=data.sources)
            g_total, t_total = None, 0.0
            for start in range(0, len(examples), chunk):
                idx = list(range(start, min(start + chunk, len(examples))))
                batch = collate(enc, idx, max_length=max_length, arch=arch, batch_size=chunk,
                                buckets=(max_length,))  # one shape: one compilation of sums
                g, t = sums(params, {k: jnp.asarray(v) for k, v in batch.items()})
                g_total = g if g_total is None else jax.tree.map(jnp.add, g_total, g)
                t_total += float(t)
            cache[unit] = (g_total, t_total)
        return cache[unit]

    return unit_examples, gradient_sums


def _one_step_update(tc):
    """``update(θ*, unit_sums) -> (θ_S, grad_norm)``: θ_S after one step of ``make_optimizer(tc)``
    on the token-mean gradient of the units whose ``(G, T)`` sums are given, and that gradient's
    global norm (before clipping): what ``fit`` computes from one batch holding every example of
    the units. One jitted step (a compilation per number of units), not eager operations."""
    tx = make_optimizer(tc, 1)

    @jax.jit
    def step(theta_star, grad_sums, tokens):
        grads = jax.tree.map(lambda *g: sum(g) / jnp.maximum(sum(tokens), 1.0), *grad_sums)
        updates, _ = tx.update(grads, tx.init(theta_star), theta_star)
        return optax.apply_updates(theta_star, updates), optax.global_norm(grads)

    def update(theta_star, unit_sums):
        theta_s, norm = step(theta_star, *zip(*[(g, jnp.float32(t)) for g, t in unit_sums]))
        return theta_s, float(norm)
    return update
