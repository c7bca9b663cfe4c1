"""jaxgrad: GradEx in JAX/Flax.

Which of my training data sources should I fine-tune on to do best on a target task? jaxgrad
answers with first-order estimates built from projected per-sample gradients (Li, Zhang, Wang,
Zhang, EMNLP 2024 Findings, arXiv 2409.19458).

Importing ``jaxgrad`` pulls in jax, flax and numpy only: ``datasets``, ``transformers`` and
``ml_collections`` are imported lazily by the functions that need them, so the jitted core runs on
machines without them. Public names are resolved on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (resolved lazily, so `import jaxgrad` stays light).
_EXPORTS: dict[str, str] = {
    "load_pretrained": "jaxgrad.models.hub",
    "LoraConfig": "jaxgrad.models.lora",
    "apply_lora": "jaxgrad.models.lora",
    "Projector": "jaxgrad.gradients.projection",
    "per_sample_projected_grads": "jaxgrad.gradients.per_sample",
    "fit_subsets": "jaxgrad.estimate.surrogate",
    "estimate_subsets": "jaxgrad.estimate.lift",
    "ensemble_scores": "jaxgrad.select.scores",
    "GradientStore": "jaxgrad.gradients.store",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jaxgrad' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))
