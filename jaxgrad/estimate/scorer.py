"""The surrogate's estimates for subsets of units, as the estimates table records them
(:class:`SurrogateScorer`): the fits of steps 3–4 on a run's gradient stores, lifted and rescaled
at θ*, and (``surrogate.mode = "exact"``) the target loss of θ* + Δ_S by a forward pass. The
estimates stage writes them; the stepwise selectors score candidate subsets with them, and the
fidelity stage compares them with real fine-tunes."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from jaxgrad import rundir
from jaxgrad.common.checks import section_dict
from jaxgrad.common.flat import tree_norm
from jaxgrad.common.sharding import global_data_mesh
from jaxgrad.data.sources import load_data
from jaxgrad.estimate.lift import estimate_subsets, exact_estimates, rescale_factors
from jaxgrad.estimate.solver import SubsetFits
from jaxgrad.estimate.subsets import masks_from_sources
from jaxgrad.estimate.surrogate import fit_subsets
from jaxgrad.estimate.target import target_batch, target_loss_fn
from jaxgrad.gradients.stage import projector_from_config
from jaxgrad.gradients.store import GradientStore
from jaxgrad.groups.stage import pipeline_units
from jaxgrad.models.lora import split_trainable, trainable_state
from jaxgrad.train.stage import load_theta_star


def _theta_norm_and_state(model, full_finetune: bool):
    state = trainable_state(model, full_finetune)
    return float(tree_norm(state)), state


class SurrogateScorer:
    """The surrogate's estimates for subsets of sources, as the estimates table records them.

    ``scorer(rows)`` fits the surrogate (``surrogate.*``) on the samples of each of the S×M
    boolean ``rows`` in one batched solve and returns, per row, the columns of ``estimates.csv``
    after ``subset`` and ``sources``: ``n_samples``, ``converged``, ``n_iter``, ``loss``,
    ``accuracy`` / ``mean_output`` (``logit_odds``; else ""), ``exact_loss`` (``surrogate.mode =
    "exact"``; else ""), each a length-S sequence. The estimates stage writes them; the
    stepwise selectors (``selection.method``) call it round by round; the fidelity stage refits
    the table's subsets with :meth:`fit` and reads :attr:`projector`, :attr:`gram` and the target
    store's ``t_feats`` / ``t_f``.
    """
    def __init__(self, config, workdir: str, sources: Sequence[str], *,
                 theta_star: tuple | None = None, data=None):
        """``theta_star``: ``(model, tokenizer)`` at θ* as :func:`load_theta_star` returns them,
        when the caller has them (else loaded here); ``data``: the run's data, likewise
        (``surrogate.mode = "exact"`` reads its target examples)."""
        s = section_dict(config, "surrogate")
        self.s = s
        self.scale = None if float(s["scale"]) <= 0 else float(s["scale"])  # None: no rescaling
        self.sources = list(sources)
        train = GradientStore.open(rundir.gradients_dir(workdir, "train"))
        target = GradientStore.open(rundir.gradients_dir(workdir, "target"))
        self.output_fn = str(config.gradients.output_fn)
        feats = train.feats()
        if self.output_fn == "token_ce":  # fit on -∇CE so that Δ lowers the loss
            feats = -feats
        self.feats = feats
        self.offsets = train.f() if s["objective"] == "taylor" else None
        units = pipeline_units(config, workdir, self.sources)
        if units.names != self.sources:
            raise ValueError(f"SurrogateScorer: sources {self.sources} are not the run's units "
                             f"{units.names}")
        self.ids = units.row_ids(train.example_ids, train.source_ids)
        model, tokenizer = theta_star or load_theta_star(config, workdir)
        self.theta_norm, theta = _theta_norm_and_state(model, bool(config.train.full_finetune))
        self.projector = projector_from_config(config, sum(int(np.prod(x.shape))
                                                for x in jax.tree_util.tree_leaves(theta)))
        self.gram = self.projector.gram()
        self.t_feats, self.t_f = target.feats(), target.f()
        self.exact_fn = None
        if s["mode"] == "exact":
            data = data if data is not None else load_data(config.data)
            self.exact_fn = _exact_loss_fn(config, data, model, tokenizer)
        self.mesh = global_data_mesh()

    def fit(self, rows) -> SubsetFits:
        """The surrogate's fits (``surrogate.*``) on the samples of each of the S×M boolean
        ``rows`` (subsets of :attr:`sources`), in one batched solve: the fits behind
        ``scorer(rows)``'s estimates."""
        return self._fit(self._masks(rows))

    def _masks(self, rows):
        return masks_from_sources(self.ids, np.asarray(rows, bool), n_sources=len(self.sources))

    def _fit(self, masks) -> SubsetFits:
        s = self.s
        return fit_subsets(self.feats, masks, objective=s["objective"], C=float(s["C"]),
                           seed=int(s["seed"]), offsets=self.offsets, mesh=self.mesh)

    def __call__(self, rows) -> dict[str, Sequence]:
        rows = np.asarray(rows, bool)
        empty = ~rows.any(axis=1)
        if empty.any():  # no sources: Δ = 0, the estimate at θ* (the stepwise selectors' start)
            out = self(rows[~empty]) if (~empty).any() else None
            base = self._at_theta_star()
            merged, j = {k: [] for k in base}, 0
            for is_empty in empty:
                for k in merged:
                    merged[k].append(base[k] if is_empty else out[k][j])
                j += not is_empty
            return merged
        n = rows.shape[0]
        masks = self._masks(rows)
        fits = self._fit(masks)
        c = rescale_factors(fits.coef, self.gram, self.theta_norm, scale=self.scale)
        est = estimate_subsets(fits.coef, c, self.t_feats, self.t_f, output=self.output_fn)
        exact = self.exact_fn(fits.coef, c, self.projector) if self.exact_fn else None
        blank = [""] * n
        return {
            "n_samples": [int(x) for x in np.asarray(masks).sum(axis=1)],
            "converged": [bool(x) for x in np.asarray(fits.converged)],
            "n_iter": [int(x) for x in np.asarray(fits.n_iter)],
            "loss": [float(x) for x in np.asarray(est["loss"])],
            "accuracy": [float(x) for x in np.asarray(est["accuracy"])] if "accuracy" in est else blank,
            "mean_output": ([float(x) for x in np.asarray(est["mean_output"])]
                            if "mean_output" in est else blank),
            "exact_loss": [float(x) for x in np.asarray(exact)] if exact is not None else blank,
        }

    def _at_theta_star(self) -> dict:
        """The columns for the empty subset: no samples, no update, the metrics at θ*."""
        zero = np.zeros((1, self.t_feats.shape[1]), np.float32)
        est = estimate_subsets(zero, np.zeros((1,), np.float32), self.t_feats, self.t_f,
                               output=self.output_fn)
        exact = (self.exact_fn(zero, np.zeros((1,), np.float32), self.projector)
                 if self.exact_fn else None)
        return {"n_samples": 0, "converged": True, "n_iter": 0,
                "loss": float(np.asarray(est["loss"])[0]),
                "accuracy": float(np.asarray(est["accuracy"])[0]) if "accuracy" in est else "",
                "mean_output": (float(np.asarray(est["mean_output"])[0])
                                if "mean_output" in est else ""),
                "exact_loss": float(np.asarray(exact)[0]) if exact is not None else ""}


def _exact_loss_fn(config, data, model, tokenizer):
    """exact mode: the target validation loss of θ* + Δ_S by a forward pass per subset.

    The loss is the one the linearized estimate predicts (``outputs.outputs_loss`` of the config's
    output function, :func:`jaxgrad.estimate.target.target_loss_fn`), so the table's ``loss`` and
    ``exact_loss`` columns compare.
    """
    _, batch = target_batch(config, data, model, tokenizer)
    graphdef, theta, rest = split_trainable(model, bool(config.train.full_finetune))
    loss_fn = target_loss_fn(config, graphdef, rest, batch)
    mesh = global_data_mesh()

    def run(coef, c, projector):
        return np.asarray(exact_estimates(loss_fn, theta, coef, c, projector, mesh=mesh,
                                          chunk_size=int(config.surrogate.exact_chunk)))
    return run
