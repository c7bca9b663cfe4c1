"""Step 1 of the method: meta-training θ* (LoRA or full fine-tuning), and the training every
later fine-tune reuses.

From the inside out: the loss (:mod:`~jaxgrad.train.losses`), the optimizer
(:mod:`~jaxgrad.train.optim`), the pure jitted steps (:mod:`~jaxgrad.train.step`), batches by
epoch (:mod:`~jaxgrad.train.batches`), greedy decoding (:mod:`~jaxgrad.train.generation`),
evaluation (:mod:`~jaxgrad.train.evaluate`: loss per source, exact-match and multiple-choice
accuracy), orbax checkpoints (:mod:`~jaxgrad.train.checkpoint`), the loop with exact resume
(:mod:`~jaxgrad.train.loop`). The stages driven by a config are imported from their modules:
:mod:`~jaxgrad.train.stage` (base model, meta-training, θ*); the final fine-tune, which reads
the selection, is the pipeline's (:mod:`jaxgrad.pipeline.finetune`).

Names are resolved on first access, so importing a light submodule (``jaxgrad.train.losses``)
does not import orbax.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxgrad._compat import moved_names
from jaxgrad.common.lazy import lazy_exports

if TYPE_CHECKING:
    from jaxgrad.train.batches import Batches
    from jaxgrad.train.batches import example_batches
    from jaxgrad.train.checkpoint import restore_params
    from jaxgrad.train.evaluate import Evaluator
    from jaxgrad.train.evaluate import answer_choices
    from jaxgrad.train.evaluate import choice_accuracy
    from jaxgrad.train.evaluate import choice_log_likelihoods
    from jaxgrad.train.evaluate import make_evaluator
    from jaxgrad.train.evaluate import target_choices
    from jaxgrad.train.generation import default_extract_answer
    from jaxgrad.train.generation import generate
    from jaxgrad.train.generation import prompt_inputs
    from jaxgrad.train.loop import MetricsLog
    from jaxgrad.train.loop import TrainResult
    from jaxgrad.train.loop import fit
    from jaxgrad.train.loop import run_training
    from jaxgrad.train.loop import save_adapter
    from jaxgrad.train.losses import batch_loss
    from jaxgrad.train.losses import batch_token_count
    from jaxgrad.train.losses import token_ce_sums
    from jaxgrad.train.losses import token_cross_entropy
    from jaxgrad.train.optim import make_optimizer
    from jaxgrad.train.optim import make_schedule
    from jaxgrad.train.step import eval_step
    from jaxgrad.train.step import loss_and_grads
    from jaxgrad.train.step import train_step

# public name -> module that defines it (resolved lazily).
_EXPORTS: dict[str, str] = {
    "Batches": "jaxgrad.train.batches",
    "example_batches": "jaxgrad.train.batches",
    "restore_params": "jaxgrad.train.checkpoint",
    "Evaluator": "jaxgrad.train.evaluate",
    "answer_choices": "jaxgrad.train.evaluate",
    "choice_accuracy": "jaxgrad.train.evaluate",
    "choice_log_likelihoods": "jaxgrad.train.evaluate",
    "make_evaluator": "jaxgrad.train.evaluate",
    "target_choices": "jaxgrad.train.evaluate",
    "default_extract_answer": "jaxgrad.train.generation",
    "generate": "jaxgrad.train.generation",
    "prompt_inputs": "jaxgrad.train.generation",
    "MetricsLog": "jaxgrad.train.loop",
    "TrainResult": "jaxgrad.train.loop",
    "fit": "jaxgrad.train.loop",
    "run_training": "jaxgrad.train.loop",
    "save_adapter": "jaxgrad.train.loop",
    "batch_loss": "jaxgrad.train.losses",
    "batch_token_count": "jaxgrad.train.losses",
    "token_ce_sums": "jaxgrad.train.losses",
    "token_cross_entropy": "jaxgrad.train.losses",
    "make_optimizer": "jaxgrad.train.optim",
    "make_schedule": "jaxgrad.train.optim",
    "eval_step": "jaxgrad.train.step",
    "loss_and_grads": "jaxgrad.train.step",
    "train_step": "jaxgrad.train.step",
}

__all__ = [
    "Batches",
    "Evaluator",
    "MetricsLog",
    "TrainResult",
    "answer_choices",
    "batch_loss",
    "batch_token_count",
    "choice_accuracy",
    "choice_log_likelihoods",
    "default_extract_answer",
    "eval_step",
    "example_batches",
    "fit",
    "generate",
    "loss_and_grads",
    "make_evaluator",
    "make_optimizer",
    "make_schedule",
    "prompt_inputs",
    "restore_params",
    "run_training",
    "save_adapter",
    "target_choices",
    "token_ce_sums",
    "token_cross_entropy",
    "train_step",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), moved_names(__name__, 4))
