"""A small gradient store written by hand, shared by the tests of jaxgrad.gradients.store,
store_write and manifest (tests/gradients/): 11 rows of k = 6 in shards of 3, and one writer of a
multi-process store as a function the ``spawn`` start method can import."""

from __future__ import annotations

import json
import os

import numpy as np

from jaxgrad.gradients.store import GradientStore

N, K, SHARD = 11, 6, 3  # 4 shards, the last one with 2 rows
SOURCES = ["alpaca", "cot", "alpaca", "flan", "cot", "cot", "alpaca", "flan", "flan", "cot", 7]


def store_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The reference rows: magnitudes in [0.5, 4) so float16 stays in its normal range."""
    rng = np.random.default_rng(seed)
    sign = rng.choice([-1.0, 1.0], size=(N, K + 1))
    values = sign * rng.uniform(0.5, 4.0, size=(N, K + 1))
    return values[:, :K].astype(np.float32), values[:, K].astype(np.float32)


def store_settings(**overrides):
    settings = dict(
        example_ids=[f"ex{r:02d}" for r in range(N)],
        source_ids=SOURCES,
        k=K,
        projector={"kind": "rademacher", "seed": 3, "dim": 1000, "k": K},
        checkpoint={"path": "/ckpt/meta", "sha256": "ab12"},
        output_fn={"name": "logit_odds", "eps": 1e-6},
        split="train",
        shard_size=SHARD,
        model="tiny-llama",
    )
    settings.update(overrides)
    return settings


def fill_store(path, shards=None, seed=0, process_index=0, process_count=1, **overrides):
    """create_or_resume + write the given (default: all missing) shards; returns the store."""
    feats, f = store_data(seed)
    store = GradientStore.create_or_resume(
        path, process_index=process_index, process_count=process_count,
        **store_settings(**overrides)
    )
    for i in store.missing_shards() if shards is None else shards:
        start, stop = store.shard_rows(i)
        store.write_shard(i, feats[start:stop], f[start:stop])
    return store


def store_shard_bytes(path) -> dict[str, bytes]:
    return {
        name: open(os.path.join(path, name), "rb").read()
        for name in sorted(os.listdir(path))
        if name != "manifest.json"
    }


def store_manifest(path) -> dict:
    with open(os.path.join(path, "manifest.json")) as fh:
        manifest = json.load(fh)
    manifest.pop("created")
    return manifest


def process_main(path: str, process_index: int, process_count: int, checkpoint_hash: str):
    """One writer of a multi-process store (run in its own process)."""
    fill_store(path, process_index=process_index, process_count=process_count,
               checkpoint={"path": "/ckpt/meta", "sha256": checkpoint_hash})
    return process_index
