"""Small shared helpers for tests: hand-built batches from the fixture reference inputs."""

from __future__ import annotations

import os

import numpy as np

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def fixture_batch(name: str, prompt_len: int = 2) -> dict:
    """A right-padded batch in jaxgrad.data.batching's layout built from reference.npz.

    Decoder: targets are the next tokens, the mask covers real next tokens after the first
    ``prompt_len`` positions. Encoder-decoder: targets are the labels, masked by the decoder mask.
    """
    ref = dict(np.load(os.path.join(fixture(name), "reference.npz")))
    ids, mask = ref["input_ids"].astype(np.int32), ref["attention_mask"].astype(np.int32)
    b = ids.shape[0]
    batch = {"input_ids": ids, "attention_mask": mask, "valid": np.ones((b,), np.float32),
             "example_index": np.arange(b, dtype=np.int32), "source_index": np.zeros((b,), np.int32)}
    if "decoder_input_ids" in ref:
        dmask = ref["decoder_attention_mask"].astype(np.int32)
        batch.update(decoder_input_ids=ref["decoder_input_ids"].astype(np.int32),
                     decoder_attention_mask=dmask,
                     targets=np.where(dmask > 0, ref["labels"], 0).astype(np.int32),
                     target_mask=dmask.astype(np.float32))
    else:
        targets = np.concatenate([ids[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
        tmask = np.concatenate([mask[:, 1:], np.zeros((b, 1), np.int32)], axis=1).astype(np.float32)
        tmask[:, :prompt_len] = 0
        batch.update(targets=targets, target_mask=tmask)
    return batch
