"""Greedy generation without a KV cache.

A fixed buffer of ``prompt + max_new_tokens`` positions is re-run through the full forward pass
at every step (decoders), or the decoder is re-run on a fixed ``max_new_tokens`` buffer with the
encoder output computed once (T5). That costs up to ``max_new_tokens`` full forwards, fine for
the small models and short answers we evaluate, and keeps one compiled program per shape. The
loop stops as soon as every row has emitted eos (a ``lax.while_loop``): the remaining tokens
would all be padding, so the result is the same as running every step.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrad.models.forward import is_encoder_decoder, model_layout


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id", "pad_id",
                                             "decoder_start_id"))
def _generate(state, input_ids, attention_mask, *, graphdef, max_new_tokens, eos_id, pad_id,
              decoder_start_id):
    model = nnx.merge(graphdef, state)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = (jnp.asarray(attention_mask) > 0).astype(jnp.int32)
    # Any padding side: move each row's prompt tokens to the front, in order (a stable sort on
    # "is padding"), so the prompt sits at positions 0..n-1 as when it is generated alone; this
    # is what transformers' generate gets from position_ids = cumsum(attention_mask) - 1.
    order = jnp.argsort(1 - attention_mask, axis=-1, stable=True)
    input_ids = jnp.take_along_axis(input_ids, order, axis=-1)
    attention_mask = jnp.take_along_axis(attention_mask, order, axis=-1)
    b = input_ids.shape[0]
    rows = jnp.arange(b)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    done = jnp.sum(attention_mask, axis=-1) == 0  # filler rows: nothing to generate

    if is_encoder_decoder(model):
        enc = model.encode(input_ids, attention_mask)
        dec = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(decoder_start_id)
        pos = jnp.arange(max_new_tokens)

        def body(carry):
            i, dec, out, done = carry
            logits = model.decode(enc, attention_mask, dec, (pos[None] <= i).astype(jnp.int32))
            tok = jnp.argmax(logits[:, i], axis=-1).astype(jnp.int32)
            tok = jnp.where(done, pad_id, tok)
            dec = dec.at[:, i + 1].set(tok, mode="drop")
            return i + 1, dec, out.at[:, i].set(tok), done | (tok == eos_id)

        return _until_done(body, (dec, out, done), max_new_tokens)[1]

    # Decoder: prompts now right-padded; row r continues at position cur[r].
    cur = jnp.sum(attention_mask, axis=-1).astype(jnp.int32)
    buf = jnp.concatenate([jnp.where(attention_mask > 0, input_ids, pad_id),
                           jnp.full((b, max_new_tokens), pad_id, jnp.int32)], axis=1)
    pos = jnp.arange(buf.shape[1])

    def body(carry):
        i, buf, cur, out, done = carry
        logits = model(buf, (pos[None] < cur[:, None]).astype(jnp.int32))
        last = jnp.take_along_axis(logits, jnp.maximum(cur - 1, 0)[:, None, None], axis=1)[:, 0]
        tok = jnp.where(done, pad_id, jnp.argmax(last, axis=-1).astype(jnp.int32))
        buf = buf.at[rows, cur].set(tok, mode="drop")
        return i + 1, buf, cur + 1, out.at[:, i].set(tok), done | (tok == eos_id)

    return _until_done(body, (buf, cur, out, done), max_new_tokens)[2]


def _until_done(body, carry, max_new_tokens: int):
    """``body`` on ``(i, *carry)`` from i = 0 while ``i < max_new_tokens`` and some row is not
    done (``carry[-1]``, ``[B]`` bool); the final carry without ``i``."""
    def not_finished(c):
        return (c[0] < max_new_tokens) & ~jnp.all(c[-1])

    return jax.lax.while_loop(not_finished, body, (jnp.int32(0), *carry))[1:]


def generate(model: nnx.Module, input_ids: jax.typing.ArrayLike,
             attention_mask: jax.typing.ArrayLike, *, max_new_tokens: int, eos_id: int,
             pad_id: int = 0, decoder_start_id: int | None = None) -> jax.Array:
    """Greedy continuation, ``[B, max_new_tokens]`` int32 (``pad_id`` after each row's eos).

    Each row's result equals generating its prompt alone, without padding, whichever side the
    batch is padded on: right (jaxgrad's batches) or left (the layout transformers' ``generate``
    expects, ``tokenizer.padding_side="left"``). The mask tells where the prompt is.

    Args:
      model: a decoder (prompts in ``input_ids``) or an encoder–decoder (encoder inputs; the
        decoder starts from ``decoder_start_id``, default the model config's
        ``decoder_start_token_id``, :func:`jaxgrad.models.forward.model_layout`).
      input_ids, attention_mask: ``[B, L]``; ``attention_mask`` is 1 on prompt tokens, which
        must be one contiguous run per row (left, right or no padding). A row of zeros is a
        filler row of a fixed-size batch: it gets ``pad_id`` throughout.
      max_new_tokens: tokens generated per row (fixed: one compiled loop).
      eos_id: end-of-sequence id; a row stops after emitting it.
      pad_id: filler after eos.

    Raises:
      ValueError: shapes differ or are not ``[B, L]``; a row's mask has a hole (not a padding
        layout: checked when the mask is readable on this host).
    """
    if int(max_new_tokens) < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens!r}")
    if np.shape(input_ids) != np.shape(attention_mask) or len(np.shape(input_ids)) != 2:
        raise ValueError(f"generate: input_ids and attention_mask must both be [B, L], got "
                         f"{np.shape(input_ids)} and {np.shape(attention_mask)}")
    _check_padding(attention_mask)
    arch, model_start = model_layout(model)
    if decoder_start_id is None:
        decoder_start_id = model_start if arch == "encoder_decoder" else 0
    graphdef, state = nnx.split(model)
    return _generate(state, input_ids, attention_mask, graphdef=graphdef,
                     max_new_tokens=int(max_new_tokens), eos_id=int(eos_id), pad_id=int(pad_id),
                     decoder_start_id=int(decoder_start_id))


def _check_padding(attention_mask) -> None:
    """Refuses masks that are not a padding layout (holes) when readable here; rows of zeros
    are the filler rows of a fixed-size batch."""
    if isinstance(attention_mask, jax.Array) and not attention_mask.is_fully_addressable:
        return  # built by our own batch code across processes: right-padded by construction
    m = np.asarray(attention_mask) > 0
    runs = np.sum(np.diff(np.pad(m.astype(np.int8), ((0, 0), (1, 1))), axis=1) == 1, axis=1)
    bad = np.flatnonzero(runs > 1)
    if bad.size:
        r = int(bad[0])
        raise ValueError(f"generate: attention_mask row {r} has {int(runs[r])} separate runs of "
                         f"1s; each row must be one contiguous prompt, padded on the left or the "
                         f"right ({bad.size} such rows)")


def prompt_inputs(batch: Mapping[str, np.ndarray], *,
                  encoder_decoder: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` of the prompts of a training-layout batch (host numpy).

    Decoder batches hold prompt + completion; the prompt ends at the position that predicts the
    first target token. Encoder–decoder batches already hold just the prompt in the encoder.

    Args:
      batch: a batch of :mod:`jaxgrad.data.batching` (``input_ids``, ``attention_mask`` and,
        for decoders, ``target_mask``; ``[B, L]`` each).
      encoder_decoder: whether the batch is an encoder–decoder one.

    Returns:
      ``(input_ids, attention_mask)``, ``[B, L]`` numpy arrays; the mask is 1 on prompt tokens
      only (int32 for decoders), ready for :func:`generate`.
    """
    ids = np.asarray(batch["input_ids"])
    mask = np.asarray(batch["attention_mask"])
    if encoder_decoder:
        return ids, mask
    tmask = np.asarray(batch["target_mask"]) > 0
    length = np.where(tmask.any(axis=1), tmask.argmax(axis=1) + 1, mask.sum(axis=1))
    prompt_mask = (np.arange(ids.shape[1])[None] < length[:, None]).astype(np.int32) * mask
    return ids, prompt_mask


def default_extract_answer(text: str) -> str:
    """The text after the last ``=`` or ``answer is`` (the whole text if neither), stripped
    (trailing periods removed too when a marker is found).

    Args:
      text: a decoded generation.

    Returns:
      The answer string (possibly empty).
    """
    cut = max(text.rfind("="), text.rfind("answer is"))
    if cut < 0:
        return text.strip()
    marker = "=" if text.startswith("=", cut) else "answer is"
    return text[cut + len(marker):].strip().rstrip(".").strip()
