"""Training and evaluation batches by epoch, from example dicts."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

from jaxgrad.data import batching


@dataclasses.dataclass(frozen=True)
class Batches:
    """Batches by epoch: ``iterate(epoch, start_step)`` yields this process's numpy batches.

    ``iterate`` must be deterministic in ``(epoch, start_step)`` and resume exactly: the batches
    from ``start_step`` on are those an iteration from 0 would give after ``start_step`` steps.
    """

    iterate: Callable[[int, int], Iterable[Mapping[str, np.ndarray]]]
    steps_per_epoch: int


def example_batches(examples: Sequence[Mapping[str, Any]], tokenizer: Any, *, batch_size: int,
                    max_length: int, shuffle: bool, seed: int = 0, encoder_decoder: bool = False,
                    sources: Sequence[str] | None = None, decoder_start_id: int | None = None,
                    drop_remainder: bool = False) -> Batches:
    """:class:`Batches` over example dicts via :func:`jaxgrad.data.batching.batch_iterator`.

    Examples are tokenized once; every process reads its own rows of each global batch.

    Args:
      examples: example dicts (:func:`jaxgrad.data.batching.encode_examples` fields).
      tokenizer: the model's tokenizer.
      batch_size: global rows per batch; max_length: tokens per sequence (truncated beyond).
      shuffle, seed: shuffle each epoch with a seed derived from ``(seed, epoch)``.
      encoder_decoder: build encoder–decoder batches (T5) instead of decoder-only ones.
      sources: the list ``source_index`` indexes (default: the sorted distinct sources);
        decoder_start_id: the encoder–decoder start token.
      drop_remainder: drop a last partial batch instead of padding it (``valid`` = 0 rows).

    Returns:
      :class:`Batches` with ``steps_per_epoch`` batches.

    Raises:
      ValueError: ``drop_remainder`` with fewer examples than ``batch_size``.
    """
    encoded = batching.encode_examples(examples, tokenizer, sources=sources,
                                       decoder_start_id=decoder_start_id)
    steps = batching.num_batches(len(encoded), batch_size, drop_remainder)
    if steps == 0:
        raise ValueError(f"{len(encoded)} examples make no batch of batch_size={batch_size} "
                         "with drop_remainder=True")

    def iterate(epoch: int, start_step: int):
        return batching.batch_iterator(
            encoded, batch_size=batch_size, max_length=max_length, shuffle=shuffle, seed=seed,
            epoch=epoch, start_step=start_step, drop_remainder=drop_remainder,
            process_index=jax.process_index(), process_count=jax.process_count(),
            arch="encoder_decoder" if encoder_decoder else "decoder")

    return Batches(iterate, steps)
