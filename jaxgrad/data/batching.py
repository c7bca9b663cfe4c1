"""Fixed-shape numpy batches of (prompt, completion) examples for causal and encoder-decoder LMs.

Examples are tokenized once (:func:`encode_examples`: prompt and completion encoded separately,
without special tokens, so the prompt/completion boundary is always a token boundary), then
laid out per batch:

Decoder (``arch="decoder"``, Llama family)::

    sequence      = [bos] + prompt + completion + [eos]            right-padded with pad to L
    input_ids     int32   [B, L]  the sequence
    attention_mask int32  [B, L]  1 on real tokens
    targets       int32   [B, L]  targets[t] = input_ids[t + 1] (pad past the end)
    target_mask   float32 [B, L]  1 where targets[t] is a completion token or the eos

so the loss is ``sum(target_mask * CE(logits, targets)) / sum(target_mask)``.

Encoder-decoder (``arch="encoder_decoder"``, T5 family)::

    input_ids, attention_mask                 [B, Le]  prompt + [eos]
    targets, decoder_attention_mask           [B, Ld]  completion + [eos]
    decoder_input_ids                         [B, Ld]  [decoder_start] + targets[:-1]
    target_mask                               [B, Ld]  1 on real targets

Both add ``example_index`` int32 [B] (index into the examples given; -1 on padding rows),
``source_index`` int32 [B] (index into ``sources``; -1 on padding rows) and ``valid`` float32 [B]
(0 on rows that only fill the last batch up to the fixed batch size). Padding rows are all pad
with attention 0 and target_mask 0, so they add nothing to masked sums; index per-example
outputs with ``example_index[valid > 0]``.

Shapes: the batch size is fixed and each length is rounded up to a bucket (default: powers of
two from 16, and ``max_length``), chosen from the longest row of the *global* batch so every
process builds the same shapes; ``jit`` compiles once per bucket.

Truncation at ``max_length`` (tokens, bos/eos included): the prompt loses tokens from the left,
the completion is kept. When the completion alone does not fit, the prompt is dropped entirely
and the completion is cut on the right, its eos dropped (decoder: ``[bos] + completion[:max_length
- 1]``; encoder-decoder: targets ``completion[:max_length]``), so the model is never taught to stop
early. For encoder-decoder, ``max_length`` bounds encoder and decoder lengths separately.

Special ids come from the tokenizer (:func:`special_ids`): a tokenizer without bos (T5, Qwen)
uses eos as the decoder's start-of-sequence token; one without pad pads with eos (only masked
positions ever hold pad). The encoder-decoder start token has no fallback: it is the model config's
``decoder_start_token_id``, which :func:`jaxgrad.models.forward.model_layout` reads for every
caller (training, evaluation, generation, the gradient store, exact estimates, fidelity), and
encoder-decoder batches refuse to be built without it.

Order: :func:`batch_iterator` permutes with ``numpy.random.default_rng([seed, epoch])``, so a
(seed, epoch) pair fixes the order; ``start_step=k`` resumes at global batch k of that epoch;
process p of P reads rows ``[p*B/P, (p+1)*B/P)`` of each global batch of size B.

numpy only: no jax, no ``datasets``/``transformers`` imports here (a tokenizer object is passed
in).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from jaxgrad._compat import moved_names

ARCHS = ("decoder", "encoder_decoder")


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Token ids the batches use.

    Attributes:
      pad: padding id (tokenizer's pad, else eos).
      bos: start of a decoder-only sequence (tokenizer's bos, else eos).
      eos: end of sequence (required).
      decoder_start: first decoder input of encoder-decoder models (the model config's
        ``decoder_start_token_id``, see :func:`jaxgrad.models.forward.model_layout`); None for
        decoder-only use.
    """

    pad: int
    bos: int
    eos: int
    decoder_start: int | None = None


def special_ids(tokenizer: Any, *, decoder_start_id: int | None = None) -> SpecialIds:
    """The :class:`SpecialIds` of a Hugging Face tokenizer, with the documented fallbacks
    (bos and pad fall back to eos).

    Args:
      tokenizer: with ``eos_token_id`` and optionally ``bos_token_id`` / ``pad_token_id``.
      decoder_start_id: the encoder–decoder start id to record (None for decoders).

    Returns:
      :class:`SpecialIds` of ints.

    Raises:
      ValueError: the tokenizer has no eos token.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos token (eos_token_id is "
                         "None); batches need one to end completions")
    bos = getattr(tokenizer, "bos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    bos = eos if bos is None else bos
    pad = eos if pad is None else pad
    start = None if decoder_start_id is None else int(decoder_start_id)
    return SpecialIds(pad=int(pad), bos=int(bos), eos=int(eos), decoder_start=start)


@dataclasses.dataclass(frozen=True)
class EncodedExamples:
    """Examples as token ids (no special tokens), ready for batching.

    Attributes:
      prompts: int32 ids of each prompt.
      completions: int32 ids of each completion.
      source_index: int32 [N], index of each example's source in ``sources``.
      sources: the source names ``source_index`` refers to.
      special: the special ids to add.
    """

    prompts: tuple[np.ndarray, ...]
    completions: tuple[np.ndarray, ...]
    source_index: np.ndarray
    sources: tuple[str, ...]
    special: SpecialIds

    def __len__(self) -> int:
        return len(self.prompts)


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each text with any Hugging Face tokenizer, without special tokens.

    Args:
      tokenizer: callable as ``transformers``' tokenizers (``tokenizer(texts,
        add_special_tokens=False)["input_ids"]``).
      texts: the strings to encode.

    Returns:
      One 1-D int32 array of token ids per text.
    """
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [np.asarray(x, dtype=np.int32).reshape(-1) for x in ids]


def encode_examples(examples: Sequence[Mapping[str, Any]], tokenizer: Any, *,
                    sources: Sequence[str] | None = None,
                    decoder_start_id: int | None = None) -> EncodedExamples:
    """Tokenizes the prompts and completions of ``examples`` (dicts with prompt/completion/source).

    Args:
      examples: example dicts, e.g. ``MultiSourceData.examples("train")``.
      tokenizer: a Hugging Face tokenizer (called with ``add_special_tokens=False``).
      sources: the list ``source_index`` indexes (pass ``MultiSourceData.sources`` so indices
        agree across splits); None: the sorted distinct sources of ``examples``.
      decoder_start_id: encoder-decoder start id (the model config's ``decoder_start_token_id``;
        :func:`jaxgrad.models.forward.encode_for_model` passes it); required to collate
        encoder-decoder batches.
    """
    if isinstance(examples, Mapping) or not isinstance(examples, Sequence):
        raise TypeError(f"examples must be a sequence of example dicts, got "
                        f"{type(examples).__name__}")
    if not examples:
        raise ValueError("examples is empty; nothing to encode")
    for i, e in enumerate(examples):
        if not isinstance(e, Mapping):
            raise TypeError(f"examples[{i}] must be a dict, got {type(e).__name__}")
        missing = [k for k in ("prompt", "completion", "source") if k not in e]
        if missing:
            raise ValueError(f"examples[{i}] lacks keys {missing}; it has {sorted(e)}")
    special = special_ids(tokenizer, decoder_start_id=decoder_start_id)
    names = [e["source"] for e in examples]
    sources = tuple(sorted(set(names))) if sources is None else tuple(sources)
    position = {s: i for i, s in enumerate(sources)}
    unknown = sorted(set(names) - set(position))
    if unknown:
        raise ValueError(f"examples have sources {unknown} that are not in sources={list(sources)}")
    return EncodedExamples(
        prompts=tuple(encode_texts(tokenizer, [e["prompt"] for e in examples])),
        completions=tuple(encode_texts(tokenizer, [e["completion"] for e in examples])),
        source_index=np.asarray([position[s] for s in names], dtype=np.int32),
        sources=sources,
        special=special)


# ----------------------------------------------------------------------------------------------
# Lengths and buckets.


def length_buckets(max_length: int, min_length: int = 16) -> tuple[int, ...]:
    """Powers of two from ``min_length`` below ``max_length``, then ``max_length`` itself.

    Args:
      max_length: the longest sequence in tokens (an int >= 2).
      min_length: the first bucket.

    Returns:
      Ascending bucket lengths (ints), ending with ``max_length``.

    Raises:
      ValueError: ``max_length`` not an int >= 2.
    """
    _check_max_length(max_length)
    out, b = [], min_length
    while b < max_length:
        out.append(b)
        b *= 2
    return tuple(out) + (max_length,)


def _check_max_length(max_length: int) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) \
            or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2 (room for bos/eos), got {max_length!r}")


def _check_buckets(buckets: Sequence[int] | None, max_length: int) -> tuple[int, ...]:
    if buckets is None:
        return length_buckets(max_length)
    buckets = tuple(int(b) for b in buckets)
    if not buckets or any(b <= a for a, b in zip(buckets, buckets[1:])) or buckets[0] < 1 \
            or buckets[-1] != max_length:
        raise ValueError(f"buckets must be increasing positive lengths ending at max_length="
                         f"{max_length}, got {buckets}")
    return buckets


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n.

    Args:
      n: a sequence length in tokens.
      buckets: allowed lengths, ascending (:func:`length_buckets`).

    Returns:
      The bucket length (int).

    Raises:
      ValueError: ``n`` exceeds the largest bucket.
    """
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"length {n} exceeds the largest bucket {buckets[-1]}")


def sequence_lengths(encoded: EncodedExamples, *, max_length: int,
                     arch: str = "decoder") -> np.ndarray:
    """Token lengths after truncation: int [N] (decoder) or int [N, 2] (encoder, decoder).

    Args:
      encoded: the :class:`EncodedExamples` of N examples.
      max_length: truncation length in tokens (bos/eos included; per side for encoder–decoder).
      arch: ``"decoder"`` or ``"encoder_decoder"``.

    Raises:
      ValueError: an unknown ``arch``.
    """
    _check_arch(arch)
    p = np.asarray([len(x) for x in encoded.prompts])
    c = np.asarray([len(x) for x in encoded.completions])
    if arch == "decoder":
        return np.minimum(p + c + 2, max_length)
    return np.stack([np.minimum(p, max_length - 1) + 1, np.minimum(c + 1, max_length)], axis=1)


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r} is unknown; expected one of {ARCHS}")


# ----------------------------------------------------------------------------------------------
# Layout.


def _decoder_tokens(prompt: np.ndarray, completion: np.ndarray, sp: SpecialIds,
                    max_length: int) -> tuple[np.ndarray, int]:
    """The sequence and the position of its first completion token."""
    room = max_length - 2 - len(completion)
    if room >= 0:
        prompt = prompt[max(0, len(prompt) - room):]
        seq = np.concatenate([[sp.bos], prompt, completion, [sp.eos]])
        return seq.astype(np.int32), 1 + len(prompt)
    seq = np.concatenate([[sp.bos], completion[:max_length - 1]])
    return seq.astype(np.int32), 1


def _seq2seq_tokens(prompt: np.ndarray, completion: np.ndarray, sp: SpecialIds,
                    max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Encoder input and decoder targets."""
    enc = np.concatenate([prompt[max(0, len(prompt) - (max_length - 1)):], [sp.eos]])
    if len(completion) + 1 <= max_length:
        tgt = np.concatenate([completion, [sp.eos]])
    else:
        tgt = completion[:max_length]
    return enc.astype(np.int32), tgt.astype(np.int32)


def _extras(encoded: EncodedExamples, rows: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    n = len(rows)
    example_index = np.full((batch_size,), -1, np.int32)
    source_index = np.full((batch_size,), -1, np.int32)
    valid = np.zeros((batch_size,), np.float32)
    example_index[:n] = rows
    source_index[:n] = encoded.source_index[rows]
    valid[:n] = 1.0
    return {"example_index": example_index, "source_index": source_index, "valid": valid}


def _padding(batch_size: int, length: int, pad: int,
             mask_dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
    """A batch of token ids that is all padding (int32) and its all-zero mask, each
    ``batch_size × length``: the collators fill in each row's tokens."""
    return (np.full((batch_size, length), pad, np.int32),
            np.zeros((batch_size, length), mask_dtype))


def _collate_decoder(encoded, rows, length, max_length, batch_size):
    sp = encoded.special
    input_ids, attention_mask = _padding(batch_size, length, sp.pad)
    targets, target_mask = _padding(batch_size, length, sp.pad, np.float32)
    for r, i in enumerate(rows):
        seq, start = _decoder_tokens(encoded.prompts[i], encoded.completions[i], sp, max_length)
        n = len(seq)
        input_ids[r, :n] = seq
        attention_mask[r, :n] = 1
        targets[r, :n - 1] = seq[1:]
        target_mask[r, start - 1:n - 1] = 1.0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets,
             "target_mask": target_mask}
    batch.update(_extras(encoded, rows, batch_size))
    return batch


def _collate_seq2seq(encoded, rows, lengths, max_length, batch_size):
    sp = encoded.special
    if sp.decoder_start is None:
        raise ValueError("encoder-decoder batches need the decoder start token: encode with "
                         "decoder_start_id=model.config.decoder_start_token_id (encode_for_model "
                         "does it); pad is not a substitute")
    enc_len, dec_len = lengths
    input_ids, attention_mask = _padding(batch_size, enc_len, sp.pad)
    decoder_input_ids, decoder_attention_mask = _padding(batch_size, dec_len, sp.pad)
    targets, target_mask = _padding(batch_size, dec_len, sp.pad, np.float32)
    for r, i in enumerate(rows):
        enc, tgt = _seq2seq_tokens(encoded.prompts[i], encoded.completions[i], sp, max_length)
        input_ids[r, :len(enc)] = enc
        attention_mask[r, :len(enc)] = 1
        targets[r, :len(tgt)] = tgt
        target_mask[r, :len(tgt)] = 1.0
        decoder_input_ids[r, 0] = sp.decoder_start
        decoder_input_ids[r, 1:len(tgt)] = tgt[:-1]
        decoder_attention_mask[r, :len(tgt)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "decoder_input_ids": decoder_input_ids,
             "decoder_attention_mask": decoder_attention_mask, "targets": targets,
             "target_mask": target_mask}
    batch.update(_extras(encoded, rows, batch_size))
    return batch


def _bucketed(lengths: np.ndarray, rows: np.ndarray, buckets: tuple[int, ...], arch: str):
    if arch == "decoder":
        return bucket_length(int(lengths[rows].max()), buckets)
    longest = lengths[rows].max(axis=0)
    return bucket_length(int(longest[0]), buckets), bucket_length(int(longest[1]), buckets)


def _layout(encoded, rows, shape, max_length, batch_size, arch):
    if arch == "decoder":
        return _collate_decoder(encoded, rows, shape, max_length, batch_size)
    return _collate_seq2seq(encoded, rows, shape, max_length, batch_size)


def collate(encoded: EncodedExamples, indices: Sequence[int], *, max_length: int,
            arch: str = "decoder", batch_size: int | None = None,
            buckets: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """One batch of the examples at ``indices`` (see the module docstring for the fields).

    Args:
      encoded: from :func:`encode_examples`.
      indices: example positions, at most ``batch_size``.
      max_length: truncation length (tokens, specials included).
      arch: "decoder" or "encoder_decoder".
      batch_size: rows of the batch; missing rows are padding (valid 0). None: len(indices).
      buckets: allowed lengths, increasing and ending at max_length (default
        :func:`length_buckets`).
    """
    _check_arch(arch)
    _check_max_length(max_length)
    buckets = _check_buckets(buckets, max_length)
    rows = np.asarray(indices, dtype=np.int64).reshape(-1)
    if rows.size == 0:
        raise ValueError("indices is empty; a batch needs at least one example")
    if rows.min() < 0 or rows.max() >= len(encoded):
        raise ValueError(f"indices must lie in [0, {len(encoded)}), got min {rows.min()}, max "
                         f"{rows.max()}")
    batch_size = len(rows) if batch_size is None else batch_size
    if batch_size < len(rows):
        raise ValueError(f"{len(rows)} indices do not fit batch_size={batch_size}")
    lengths = sequence_lengths(encoded, max_length=max_length, arch=arch)
    shape = _bucketed(lengths, rows, buckets, arch)
    return _layout(encoded, rows, shape, max_length, batch_size, arch)


# ----------------------------------------------------------------------------------------------
# Iteration.


def num_batches(n_examples: int, batch_size: int, drop_remainder: bool = False) -> int:
    """Global batches per epoch, an int: floor (``drop_remainder``) or ceil of ``n_examples /
    batch_size``.

    Args:
      n_examples: examples in the epoch; batch_size: the global batch size (> 0).
      drop_remainder: count only full batches (else the last partial batch counts).
    """
    return n_examples // batch_size if drop_remainder else -(-n_examples // batch_size)


def batch_iterator(examples: Sequence[Mapping[str, Any]] | EncodedExamples, tokenizer: Any = None,
                   *, batch_size: int, max_length: int, shuffle: bool = True, seed: int = 0,
                   epoch: int = 0, start_step: int = 0, drop_remainder: bool = False,
                   process_index: int = 0, process_count: int = 1, arch: str = "decoder",
                   sources: Sequence[str] | None = None, buckets: Sequence[int] | None = None,
                   decoder_start_id: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Batches of one epoch, deterministic given (seed, epoch), resumable, sharded by process.

    Args:
      examples: example dicts (tokenized here with ``tokenizer``) or :class:`EncodedExamples`
        (tokenize once with :func:`encode_examples` when iterating many epochs; ``tokenizer``,
        ``sources`` and ``decoder_start_id`` are then unused).
      tokenizer: a Hugging Face tokenizer (see :func:`encode_examples`).
      batch_size: the *global* batch size B; each process gets B / process_count rows.
      max_length: truncation length in tokens (see the module docstring).
      shuffle: permute the examples with ``default_rng([seed, epoch])``; False keeps their order.
      seed: shuffling seed.
      epoch: epoch number, mixed into the permutation.
      start_step: first global batch to produce (resume): the batches are exactly those from
        ``start_step`` on of the same (seed, epoch) iteration started at 0.
      drop_remainder: drop the last incomplete batch instead of padding it with invalid rows.
      process_index: this process, in [0, process_count).
      process_count: processes sharing each global batch; must divide batch_size.
      arch: "decoder" or "encoder_decoder".
      sources: list ``source_index`` refers to (see :func:`encode_examples`).
      buckets: allowed lengths (default :func:`length_buckets`).
      decoder_start_id: encoder-decoder start id (required for ``arch="encoder_decoder"``; see
        :func:`jaxgrad.models.forward.model_layout`).

    Returns:
      An iterator over batch dicts of numpy arrays with B / process_count rows each.
    """
    _check_arch(arch)
    _check_max_length(max_length)
    buckets = _check_buckets(buckets, max_length)
    for name, value, low in (("batch_size", batch_size, 1), ("process_count", process_count, 1),
                             ("process_index", process_index, 0), ("start_step", start_step, 0),
                             ("epoch", epoch, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if process_index >= process_count:
        raise ValueError(f"process_index={process_index} must be < process_count={process_count}")
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} must be divisible by process_count="
                         f"{process_count} (each process reads an equal share of a global batch)")
    if isinstance(examples, EncodedExamples):
        encoded = examples
    else:
        if tokenizer is None:
            raise ValueError("tokenizer is required when examples are not EncodedExamples")
        encoded = encode_examples(examples, tokenizer, sources=sources,
                                  decoder_start_id=decoder_start_id)
    n = len(encoded)
    if n == 0:
        raise ValueError("examples is empty; nothing to batch")
    steps = num_batches(n, batch_size, drop_remainder)
    if start_step > steps:
        raise ValueError(f"start_step={start_step} is past the end of the epoch ({steps} batches "
                         f"of {batch_size} from {n} examples)")
    order = (np.random.default_rng([int(seed), int(epoch)]).permutation(n) if shuffle
             else np.arange(n))
    lengths = sequence_lengths(encoded, max_length=max_length, arch=arch)
    local = batch_size // process_count

    def generate():
        for step in range(start_step, steps):
            rows = order[step * batch_size:(step + 1) * batch_size]
            shape = _bucketed(lengths, rows, buckets, arch)  # from the global batch
            mine = rows[process_index * local:(process_index + 1) * local]
            yield _layout(encoded, mine, shape, max_length, local, arch)

    return generate()


__getattr__ = moved_names(__name__)  # names that moved out of this module (jaxgrad._compat)
