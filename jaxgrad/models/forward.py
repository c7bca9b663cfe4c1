"""The one place that knows how to call a model on a batch.

A batch (see :mod:`jaxgrad.data.batching`) holds the model's inputs and, for the loss,
``targets``, ``target_mask`` and ``valid``. :func:`is_encoder_decoder` is the one test of a
model's kind; :func:`model_layout` turns it into the batch layout (``arch`` and the decoder start
id) every batch builder reads, :func:`encode_for_model` encodes examples in that layout, and
:func:`model_logits` is the single adapter between a batch dict and a model's call signature
(decoder or encoder–decoder). Training, evaluation, per-sample gradients, exact subset evaluation
and fidelity all go through it; :func:`last_hidden_states` is the same for the representations of
the representation-similarity baseline.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad.data.batching import EncodedExamples, encode_examples

Batch = Mapping[str, jax.typing.ArrayLike]

DECODER_FIELDS = ("input_ids", "attention_mask")
ENCODER_DECODER_FIELDS = DECODER_FIELDS + ("decoder_input_ids", "decoder_attention_mask")
# The fields of a batch that per-sample gradients carry into the jitted computation: the model's
# inputs (either kind) and what its output function reads.
MODEL_INPUTS = ENCODER_DECODER_FIELDS + ("targets", "target_mask")


def is_encoder_decoder(model: Any) -> bool:
    """Whether ``model`` is an encoder–decoder (T5) rather than a decoder-only LM: the class
    flag ``is_encoder_decoder`` (``CausalLM`` sets False, T5 True; anything without it is a
    decoder)."""
    return bool(getattr(model, "is_encoder_decoder", False))


def model_layout(model: Any) -> tuple[str, int | None]:
    """``(arch, decoder_start_id)`` of a model: the one place every batch builder reads them.

    ``arch`` is ``"encoder_decoder"`` when :func:`is_encoder_decoder` (T5 family), else
    ``"decoder"``; ``decoder_start_id`` is ``model.config.decoder_start_token_id`` for
    encoder-decoders (what transformers' ``_shift_right`` puts first) and None for decoders.

    Raises:
      ValueError: an encoder-decoder whose config has no integer ``decoder_start_token_id``.
    """
    if not is_encoder_decoder(model):
        return "decoder", None
    start = getattr(getattr(model, "config", None), "decoder_start_token_id", None)
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)):
        raise ValueError(f"{type(model).__name__}: config.decoder_start_token_id is {start!r}; an "
                         f"encoder-decoder needs an integer start token for its decoder")
    return "encoder_decoder", int(start)


def encode_for_model(examples: Sequence[Mapping[str, Any]], tokenizer: Any, model: Any, *,
                     sources: Sequence[str] | None = None) -> tuple[EncodedExamples, str]:
    """:func:`jaxgrad.data.batching.encode_examples` with the model's own layout: ``(encoded,
    arch)`` for ``collate`` / ``batch_iterator``, the decoder start taken from
    :func:`model_layout`."""
    arch, start = model_layout(model)
    return encode_examples(examples, tokenizer, sources=sources, decoder_start_id=start), arch


def model_logits(model: Any, batch: Batch, dropout_rng: jax.Array | None = None) -> jax.Array:
    """Logits ``[B, L, V]`` (float32) of ``model`` on ``batch``.

    Decoders get ``input_ids, attention_mask``; encoder–decoders (:func:`is_encoder_decoder`)
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


def last_hidden_states(model: Any, batch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
    """``(hidden [B, L, H] float32, mask [B, L])`` of ``model`` on ``batch``: a decoder's final
    normed hidden states over its tokens, an encoder–decoder's encoder output over its inputs.

    Raises:
      TypeError: the model exposes neither ``hidden_states`` (decoders) nor ``encode`` (T5).
    """
    if is_encoder_decoder(model):
        h = model.encode(batch["input_ids"], batch["attention_mask"])
        return h.astype(jnp.float32), batch["attention_mask"]
    hidden = getattr(model, "hidden_states", None)
    if hidden is None or not callable(hidden):
        raise TypeError(f"last_hidden_states: {type(model).__name__} has neither "
                        "`hidden_states` (decoder families) nor `encode` (T5)")
    return hidden(batch["input_ids"], batch["attention_mask"]).astype(jnp.float32), \
        batch["attention_mask"]
