"""Step 5 of the method: from subset estimates to a selection of sources, and its baselines.

:mod:`~jaxgrad.select.scores` (random-ensemble scores with bootstrap intervals, top-k and
threshold selections), :mod:`~jaxgrad.select.stepwise` (forward and ordered stepwise selection on
the surrogate), :mod:`~jaxgrad.select.baselines` (all sources, random, gradient similarity),
:mod:`~jaxgrad.select.representations` (the representation-similarity baseline's features), and
:mod:`~jaxgrad.select.stage`, the pipeline stage.

The names below are resolved on first access, so ``import jaxgrad.select.scores`` loads
nothing else of the package (representations load the model families).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxgrad._compat import moved_names
from jaxgrad.common.lazy import lazy_exports

if TYPE_CHECKING:
    from jaxgrad.select.baselines import baseline_all
    from jaxgrad.select.baselines import baseline_random
    from jaxgrad.select.baselines import baseline_random_total
    from jaxgrad.select.baselines import gradient_similarity_scores
    from jaxgrad.select.representations import mean_representations
    from jaxgrad.select.scores import EnsembleScores
    from jaxgrad.select.scores import ensemble_scores
    from jaxgrad.select.scores import select_threshold
    from jaxgrad.select.scores import select_top
    from jaxgrad.select.stepwise import ScoreFn
    from jaxgrad.select.stepwise import StepwiseResult
    from jaxgrad.select.stepwise import forward_selection
    from jaxgrad.select.stepwise import ordered_selection

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
    "mean_representations",
    "ordered_selection",
    "select_threshold",
    "select_top",
]

# public name -> module that defines it (resolved lazily).
_EXPORTS: dict[str, str] = {
    "baseline_all": "jaxgrad.select.baselines",
    "baseline_random": "jaxgrad.select.baselines",
    "baseline_random_total": "jaxgrad.select.baselines",
    "gradient_similarity_scores": "jaxgrad.select.baselines",
    "mean_representations": "jaxgrad.select.representations",
    "EnsembleScores": "jaxgrad.select.scores",
    "ensemble_scores": "jaxgrad.select.scores",
    "select_threshold": "jaxgrad.select.scores",
    "select_top": "jaxgrad.select.scores",
    "ScoreFn": "jaxgrad.select.stepwise",
    "StepwiseResult": "jaxgrad.select.stepwise",
    "forward_selection": "jaxgrad.select.stepwise",
    "ordered_selection": "jaxgrad.select.stepwise",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), moved_names(__name__, 4))
