"""The one place that knows how to call a model on a batch.

A batch (see :mod:`jaxgrad.data.batching`) holds the model's inputs and, for the loss,
``targets``, ``target_mask`` and ``valid``. :func:`model_logits` is the single adapter between a
batch dict and a model's call signature (decoder or encoder–decoder, chosen by
``model.is_encoder_decoder``). Training, evaluation, per-sample gradients and exact subset
evaluation all go through it.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax

Batch = Mapping[str, jax.typing.ArrayLike]

DECODER_FIELDS = ("input_ids", "attention_mask")
ENCODER_DECODER_FIELDS = DECODER_FIELDS + ("decoder_input_ids", "decoder_attention_mask")


def is_encoder_decoder(model: Any) -> bool:
    """Whether ``model`` is an encoder–decoder (T5) rather than a decoder-only LM: the class
    flag ``is_encoder_decoder`` (``CausalLM`` sets False, T5 True; anything without it is a
    decoder)."""
    return bool(getattr(model, "is_encoder_decoder", False))


def model_logits(model: Any, batch: Batch, dropout_rng: jax.Array | None = None) -> jax.Array:
    """Logits ``[B, L, V]`` (float32) of ``model`` on ``batch``.

    Decoders get ``input_ids, attention_mask``; encoder–decoders (``model.is_encoder_decoder``)
    also get ``decoder_input_ids, decoder_attention_mask``. ``dropout_rng`` turns on LoRA dropout.

    Raises:
      ValueError: the batch lacks a field the model needs.
    """
    fields = ENCODER_DECODER_FIELDS if is_encoder_decoder(model) else DECODER_FIELDS
    missing = [f for f in fields if f not in batch]
    if missing:
        kind = "encoder-decoder" if len(fields) == 4 else "decoder"
        raise ValueError(f"model_logits: batch lacks {missing} needed by a {kind} model; "
                         f"batch has {sorted(batch)}")
    return model(*(batch[f] for f in fields), dropout_rng=dropout_rng)
