"""Steps 3–4 of the method: a surrogate fit per subset of sources, and its estimated effect.

For every subset S of the sources (:mod:`~jaxgrad.estimate.subsets`), an L2-regularised logistic
regression on the projected per-sample gradients of S's samples (:func:`fit_subsets`,
:mod:`~jaxgrad.estimate.surrogate`, solved for thousands of subsets at once by
:mod:`~jaxgrad.estimate.solver`); its coefficients lifted to a parameter update
``Δ_S = c_S · P w_S`` and the target metrics of ``θ* + Δ_S`` estimated to first order or exactly
(:mod:`~jaxgrad.estimate.lift`). Input checks and the subset-sharded layout:
:mod:`~jaxgrad.estimate.arrays`. On a run directory: :class:`SurrogateScorer`
(:mod:`~jaxgrad.estimate.scorer`) scores subsets of its units as the estimates table records them,
:mod:`~jaxgrad.estimate.target` builds the target batch and metric, and
:mod:`~jaxgrad.estimate.stage` is the pipeline stage that writes the table
(:func:`read_estimates` reads it).

Example::

    subsets = sample_subsets(n_sources, 1000, 0.5, seed=0)           # S×M booleans
    fits = fit_subsets(feats_NxK, masks_from_sources(source_ids_N, subsets), C=1e-4, seed=0)
    c_S = rescale_factors(fits.coef, projector, theta_norm, scale=0.1)
    est = estimate_subsets(fits, c_S, target_feats_JxK, target_f_J)
    est["loss"]      # S, mean target loss of θ* + Δ_S (lower is better)

The names below are resolved on first access, so ``import jaxgrad.estimate.surrogate`` loads
nothing else of the package (the scorer and the stage load θ* through :mod:`jaxgrad.train`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxgrad._compat import moved_names
from jaxgrad.common.lazy import lazy_exports

if TYPE_CHECKING:
    from jaxgrad.estimate.lift import HIGHER_IS_BETTER
    from jaxgrad.estimate.lift import estimate_subsets
    from jaxgrad.estimate.lift import exact_estimates
    from jaxgrad.estimate.lift import lift_updates
    from jaxgrad.estimate.lift import rescale_factors
    from jaxgrad.estimate.scorer import SurrogateScorer
    from jaxgrad.estimate.solver import SubsetFits
    from jaxgrad.estimate.stage import read_estimates
    from jaxgrad.estimate.subsets import masks_from_sources
    from jaxgrad.estimate.subsets import sample_subsets
    from jaxgrad.estimate.subsets import subset_size
    from jaxgrad.estimate.surrogate import fit_subsets
    from jaxgrad.estimate.surrogate import gradex_labels

__all__ = [
    "HIGHER_IS_BETTER",
    "SubsetFits",
    "SurrogateScorer",
    "estimate_subsets",
    "exact_estimates",
    "fit_subsets",
    "gradex_labels",
    "lift_updates",
    "masks_from_sources",
    "read_estimates",
    "rescale_factors",
    "sample_subsets",
    "subset_size",
]

# public name -> module that defines it (resolved lazily).
_EXPORTS: dict[str, str] = {
    "HIGHER_IS_BETTER": "jaxgrad.estimate.lift",
    "estimate_subsets": "jaxgrad.estimate.lift",
    "exact_estimates": "jaxgrad.estimate.lift",
    "lift_updates": "jaxgrad.estimate.lift",
    "rescale_factors": "jaxgrad.estimate.lift",
    "SurrogateScorer": "jaxgrad.estimate.scorer",
    "SubsetFits": "jaxgrad.estimate.solver",
    "read_estimates": "jaxgrad.estimate.stage",
    "masks_from_sources": "jaxgrad.estimate.subsets",
    "sample_subsets": "jaxgrad.estimate.subsets",
    "subset_size": "jaxgrad.estimate.subsets",
    "fit_subsets": "jaxgrad.estimate.surrogate",
    "gradex_labels": "jaxgrad.estimate.surrogate",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), moved_names(__name__, 4))
