"""Steps 3–4 of the method: a surrogate fit per subset of sources, and its estimated effect.

For every subset S of the sources (:mod:`~jaxgrad.estimate.subsets`), an L2-regularised logistic
regression on the projected per-sample gradients of S's samples (:func:`fit_subsets`,
:mod:`~jaxgrad.estimate.surrogate`, solved for thousands of subsets at once by
:mod:`~jaxgrad.estimate.solver`); its coefficients lifted to a parameter update
``Δ_S = c_S · P w_S`` and the target metrics of ``θ* + Δ_S`` estimated to first order or exactly
(:mod:`~jaxgrad.estimate.lift`). Input checks and the subset-sharded layout:
:mod:`~jaxgrad.estimate.arrays`.

Example::

    subsets = sample_subsets(n_sources, 1000, 0.5, seed=0)           # S×M booleans
    fits = fit_subsets(feats_NxK, masks_from_sources(source_ids_N, subsets), C=1e-4, seed=0)
    c_S = rescale_factors(fits.coef, projector, theta_norm, scale=0.1)
    est = estimate_subsets(fits, c_S, target_feats_JxK, target_f_J)
    est["loss"]      # S, mean target loss of θ* + Δ_S (lower is better)
"""

from jaxgrad.estimate.lift import (
    HIGHER_IS_BETTER,
    estimate_subsets,
    exact_estimates,
    lift_updates,
    rescale_factors,
)
from jaxgrad.estimate.solver import SubsetFits
from jaxgrad.estimate.subsets import masks_from_sources, sample_subsets, subset_size
from jaxgrad.estimate.surrogate import fit_subsets, gradex_labels

__all__ = [
    "HIGHER_IS_BETTER",
    "SubsetFits",
    "estimate_subsets",
    "exact_estimates",
    "fit_subsets",
    "gradex_labels",
    "lift_updates",
    "masks_from_sources",
    "rescale_factors",
    "sample_subsets",
    "subset_size",
]
