"""jaxgrad: GradEx in JAX/Flax.

Which of my training data sources should I fine-tune on to do best on a target task? jaxgrad
answers with first-order estimates built from projected per-sample gradients (Li, Zhang, Wang,
Zhang, EMNLP 2024 Findings, arXiv 2409.19458).

The packages, in the order of the method:

* :mod:`jaxgrad.config` — every config section's keys and defaults (the one source);
  :mod:`jaxgrad.rundir` — where each stage's artefacts live in a run directory;
  :mod:`jaxgrad.common` — helpers with no step of the method in them;
* :mod:`jaxgrad.data` — the training sources and the target: files, BIG-bench, synthetic tasks;
* :mod:`jaxgrad.models` — Flax NNX models over Hugging Face / GGUF weights, LoRA, PEFT files;
* :mod:`jaxgrad.train` — step 1: meta-training θ* on all sources (and every fine-tune);
* :mod:`jaxgrad.gradients` — step 2: per-sample gradients at θ*, randomly projected, stored;
* :mod:`jaxgrad.groups` — step 2b (optional): clusters of samples as the units selected among;
* :mod:`jaxgrad.estimate` — steps 3–4: a logistic surrogate per subset of sources, and the
  estimated target metrics of fine-tuning on it;
* :mod:`jaxgrad.select` — step 5: random-ensemble scores, the selection, stepwise search,
  baselines;
* :mod:`jaxgrad.pipeline` — the stages run in order, with fingerprints, final fine-tunes,
  the fidelity check and the report.

Importing ``jaxgrad`` pulls in nothing heavy: the names below are resolved on first access (a
type checker sees them through the ``TYPE_CHECKING`` imports), so the jitted core runs on
machines without ``datasets``, ``transformers`` or ``ml_collections``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxgrad import _compat
from jaxgrad.common.lazy import lazy_exports

__version__ = "0.1.0"

if TYPE_CHECKING:
    from jaxgrad.config import default_config
    from jaxgrad.data.multisource import MultiSourceData
    from jaxgrad.data.sources import load_data
    from jaxgrad.data.synthetic import synthetic_sources
    from jaxgrad.estimate.lift import estimate_subsets
    from jaxgrad.estimate.lift import exact_estimates
    from jaxgrad.estimate.lift import rescale_factors
    from jaxgrad.estimate.subsets import masks_from_sources
    from jaxgrad.estimate.subsets import sample_subsets
    from jaxgrad.estimate.surrogate import fit_subsets
    from jaxgrad.gradients.compute import compute_gradient_store
    from jaxgrad.gradients.per_sample import per_sample_projected_grads
    from jaxgrad.gradients.projection import Projector
    from jaxgrad.gradients.store import GradientStore
    from jaxgrad.groups.units import Units
    from jaxgrad.groups.units import make_groups
    from jaxgrad.models.hub import load_pretrained
    from jaxgrad.models.lora import LoraConfig
    from jaxgrad.models.lora import apply_lora
    from jaxgrad.pipeline import run_pipeline
    from jaxgrad.select.baselines import gradient_similarity_scores
    from jaxgrad.select.scores import ensemble_scores
    from jaxgrad.select.scores import select_top
    from jaxgrad.select.stepwise import forward_selection

__all__ = [
    "GradientStore",
    "LoraConfig",
    "MultiSourceData",
    "Projector",
    "Units",
    "apply_lora",
    "compute_gradient_store",
    "default_config",
    "ensemble_scores",
    "estimate_subsets",
    "exact_estimates",
    "fit_subsets",
    "forward_selection",
    "gradient_similarity_scores",
    "load_data",
    "load_pretrained",
    "make_groups",
    "masks_from_sources",
    "per_sample_projected_grads",
    "rescale_factors",
    "run_pipeline",
    "sample_subsets",
    "select_top",
    "synthetic_sources",
]

# public name -> module that defines it (the TYPE_CHECKING imports above, for the interpreter)
_EXPORTS: dict[str, str] = {
    "GradientStore": "jaxgrad.gradients.store",
    "LoraConfig": "jaxgrad.models.lora",
    "MultiSourceData": "jaxgrad.data.multisource",
    "Projector": "jaxgrad.gradients.projection",
    "Units": "jaxgrad.groups.units",
    "apply_lora": "jaxgrad.models.lora",
    "compute_gradient_store": "jaxgrad.gradients.compute",
    "default_config": "jaxgrad.config",
    "ensemble_scores": "jaxgrad.select.scores",
    "estimate_subsets": "jaxgrad.estimate.lift",
    "exact_estimates": "jaxgrad.estimate.lift",
    "fit_subsets": "jaxgrad.estimate.surrogate",
    "forward_selection": "jaxgrad.select.stepwise",
    "gradient_similarity_scores": "jaxgrad.select.baselines",
    "load_data": "jaxgrad.data.sources",
    "load_pretrained": "jaxgrad.models.hub",
    "make_groups": "jaxgrad.groups.units",
    "masks_from_sources": "jaxgrad.estimate.subsets",
    "per_sample_projected_grads": "jaxgrad.gradients.per_sample",
    "rescale_factors": "jaxgrad.estimate.lift",
    "run_pipeline": "jaxgrad.pipeline",
    "sample_subsets": "jaxgrad.estimate.subsets",
    "select_top": "jaxgrad.select.scores",
    "synthetic_sources": "jaxgrad.data.synthetic",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
_compat.install()  # the import paths of 0.1 that moved keep working, with a warning
