"""Step 5 of the method: from subset estimates to a selection of sources, and its baselines.

:mod:`~jaxgrad.select.scores` (random-ensemble scores with bootstrap intervals, top-k and
threshold selections), :mod:`~jaxgrad.select.stepwise` (forward and ordered stepwise selection on
the surrogate), :mod:`~jaxgrad.select.baselines` (all sources, random, gradient similarity).
"""

from jaxgrad.select.baselines import (
    baseline_all,
    baseline_random,
    baseline_random_total,
    gradient_similarity_scores,
)
from jaxgrad.select.scores import EnsembleScores, ensemble_scores, select_threshold, select_top
from jaxgrad.select.stepwise import (
    ScoreFn,
    StepwiseResult,
    forward_selection,
    ordered_selection,
)

__all__ = [
    "EnsembleScores",
    "ScoreFn",
    "StepwiseResult",
    "baseline_all",
    "baseline_random",
    "baseline_random_total",
    "ensemble_scores",
    "forward_selection",
    "gradient_similarity_scores",
    "ordered_selection",
    "select_threshold",
    "select_top",
]
