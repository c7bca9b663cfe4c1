"""Step 2 of GradEx: projected per-sample gradients ``x_i = Pᵀ ∇f_i(θ*)`` and their store.

Modules, in the order the step uses them:

* ``outputs``: the per-sample output functions f_i (``logit_odds``, ``token_ce``) and the
  target loss built from them;
* ``prng``, ``xla``, ``pallas``, ``projection``: the random projection P, never stored (the
  counter-based hash its entries are made of, the XLA path, the Pallas GPU/TPU kernels, and the
  :class:`Projector` that chooses between them);
* ``per_sample``: ``jit(vmap(grad))`` fused with the projection;
* ``manifest``, ``store``, ``store_write``: the resumable on-disk store of the x_i and f_i (its
  format and identity, reading it, writing it);
* ``compute``: filling a store from a model and a dataset;
* ``stage``: the pipeline stage, and the projector a run's config defines.

The names below are resolved on first access, so ``import jaxgrad.gradients.projection`` loads
nothing else of the package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxgrad._compat import moved_names
from jaxgrad.common.lazy import lazy_exports

if TYPE_CHECKING:
    from jaxgrad.gradients.compute import compute_gradient_store
    from jaxgrad.gradients.manifest import IncompleteStoreError
    from jaxgrad.gradients.manifest import StoreMismatchError
    from jaxgrad.gradients.outputs import get_output_fn
    from jaxgrad.gradients.outputs import logit_odds
    from jaxgrad.gradients.outputs import outputs_loss
    from jaxgrad.gradients.outputs import token_ce
    from jaxgrad.gradients.per_sample import PerSampleResult
    from jaxgrad.gradients.per_sample import num_trainable
    from jaxgrad.gradients.per_sample import per_sample_projected_grads
    from jaxgrad.gradients.projection import Projector
    from jaxgrad.gradients.stage import projector_from_config
    from jaxgrad.gradients.store import GradientStore

__all__ = [
    "GradientStore",
    "IncompleteStoreError",
    "PerSampleResult",
    "Projector",
    "StoreMismatchError",
    "compute_gradient_store",
    "get_output_fn",
    "logit_odds",
    "num_trainable",
    "outputs_loss",
    "per_sample_projected_grads",
    "projector_from_config",
    "token_ce",
]

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "GradientStore": "jaxgrad.gradients.store",
    "IncompleteStoreError": "jaxgrad.gradients.manifest",
    "PerSampleResult": "jaxgrad.gradients.per_sample",
    "Projector": "jaxgrad.gradients.projection",
    "StoreMismatchError": "jaxgrad.gradients.manifest",
    "compute_gradient_store": "jaxgrad.gradients.compute",
    "get_output_fn": "jaxgrad.gradients.outputs",
    "logit_odds": "jaxgrad.gradients.outputs",
    "num_trainable": "jaxgrad.gradients.per_sample",
    "outputs_loss": "jaxgrad.gradients.outputs",
    "per_sample_projected_grads": "jaxgrad.gradients.per_sample",
    "projector_from_config": "jaxgrad.gradients.stage",
    "token_ce": "jaxgrad.gradients.outputs",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), moved_names(__name__, 4))
