"""jaxgrad.gradients.store_write: creating, resuming and writing a store (crash safety, the
checks of what is written and of the arguments), and several processes writing one store and
merging it."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest

from helpers.stores import (K, N, SOURCES, fill_store, process_main, store_data, store_manifest,
                            store_settings, store_shard_bytes)
from jaxgrad.gradients.manifest import IncompleteStoreError, StoreMismatchError
from jaxgrad.gradients.store import GradientStore


def test_resume_after_crash_matches_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    fill_store(reference)
    crashed = tmp_path / "crashed"
    store = fill_store(crashed, shards=[0, 1, 3])
    # Shard 2: killed while writing (a temporary file only).
    (crashed / "shard_00002.feats.npy.tmp").write_bytes(b"\x93NUMPY half a shard")
    # Shard 3: only one of its two files survived.
    os.remove(crashed / "shard_00003.feats.npy")
    assert not store.complete
    with pytest.raises(IncompleteStoreError, match=r"2 of 4 shards are missing: \[2-3\]"):
        GradientStore.open(crashed)

    resumed = GradientStore.create_or_resume(crashed, **store_settings())
    assert resumed.missing_shards() == [2, 3], "partial shards must count as missing"
    assert not (crashed / "shard_00002.feats.npy.tmp").exists(), "tmp leftover not cleaned"
    fill_store(crashed)
    assert store_shard_bytes(crashed) == store_shard_bytes(reference), "resumed shards differ"
    assert store_manifest(crashed) == store_manifest(reference)


def test_nonfinite_rows_refused(tmp_path):
    feats, f = store_data()
    store = GradientStore.create_or_resume(tmp_path / "s", **store_settings())
    bad = feats[3:6].copy()
    bad[1, 4] = np.nan
    with pytest.raises(ValueError, match=r"feats of shard 1 has non-finite .* rows \[4\].*'ex04'"):
        store.write_shard(1, bad, f[3:6])
    bad_f = f[3:6].copy()
    bad_f[2] = np.inf
    with pytest.raises(ValueError, match=r"f of shard 1 has non-finite .* rows \[5\]"):
        store.write_shard(1, feats[3:6], bad_f)
    assert store.missing_shards() == [0, 1, 2, 3], "a refused shard must not be written"
    store.write_shard(1, bad, f[3:6], allow_nonfinite=True)
    assert store.missing_shards() == [0, 2, 3]

    half = GradientStore.create_or_resume(tmp_path / "h", **store_settings(dtype="float16"))
    with pytest.raises(ValueError, match="beyond the range of the storage dtype float16"):
        half.write_shard(0, feats[0:3] * 1e5, f[0:3])


def test_write_shard_checks_input(tmp_path):
    feats, f = store_data()
    store = GradientStore.create_or_resume(tmp_path / "s", **store_settings())
    with pytest.raises(ValueError, match=r"shape \(rows, k\) = \(2, 6\)"):
        store.write_shard(3, feats[9:12, :5], f[9:11])
    with pytest.raises(ValueError, match=r"shape \(rows,\) = \(3,\)"):
        store.write_shard(0, feats[0:3], f[0:4])
    with pytest.raises(TypeError, match="floating"):
        store.write_shard(0, np.ones((3, K), np.int32), f[0:3])
    with pytest.raises(ValueError, match="out of range"):
        store.write_shard(4, feats[0:3], f[0:3])
    with pytest.raises(ValueError, match="read-only"):
        fill_store(tmp_path / "t")
        GradientStore.open(tmp_path / "t").write_shard(0, feats[0:3], f[0:3])
    other = GradientStore.create_or_resume(
        tmp_path / "p", process_index=1, process_count=2, **store_settings()
    )
    assert other.owned_shards == [1, 3]
    with pytest.raises(ValueError, match="shard 2 belongs to process 0"):
        other.write_shard(2, feats[6:9], f[6:9])


@pytest.mark.parametrize(
    "override, error, text",
    [
        ({"dtype": "int8"}, ValueError, "dtype must be one of"),
        ({"example_ids": ["a"] * N}, ValueError, "example_ids must be unique"),
        ({"source_ids": SOURCES[:-1]}, ValueError, "one entry per example: got 10 for 11"),
        ({"k": 0}, ValueError, "k must be >= 1"),
        ({"shard_size": 2.5}, TypeError, "shard_size must be an int"),
        ({"projector": "rademacher"}, TypeError, "projector must be a dict"),
        ({"projector": {"seed": 3, "k": K + 2}}, ValueError, r"projector\['k'\] = 8 differs"),
        ({"checkpoint": {"weights": object()}}, TypeError, "checkpoint must be JSON"),
    ],
)
def test_bad_arguments(tmp_path, override, error, text):
    with pytest.raises(error, match=text):
        GradientStore.create_or_resume(tmp_path / "s", **store_settings(**override))
    with pytest.raises(ValueError, match="process_index must be in"):
        GradientStore.create_or_resume(tmp_path / "s", process_index=2, process_count=2,
                                       **store_settings())


def test_shards_without_manifest_refused(tmp_path):
    fill_store(tmp_path / "s", shards=[0])
    os.remove(tmp_path / "s" / "manifest.json")
    with pytest.raises(StoreMismatchError, match="shard files but no manifest.json"):
        GradientStore.create_or_resume(tmp_path / "s", **store_settings())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_processes_give_the_same_store_as_one(tmp_path, dtype):
    reference = tmp_path / "one"
    fill_store(reference, dtype=dtype)
    both = tmp_path / "two"
    # Process 1 first, so it also meets a directory without a manifest; then the other order.
    p1 = fill_store(both, process_index=1, process_count=2, dtype=dtype)
    assert p1.owned_shards == [1, 3] and p1.missing_shards() == []
    with pytest.raises(IncompleteStoreError, match="not merged"):
        GradientStore.open(both)
    with pytest.raises(IncompleteStoreError, match=r"process\(es\) \[0\] of 2 never started"):
        GradientStore.merge(both)
    # Leftovers of a crashed process 0: its own shard's tmp and a manifest being written.
    (both / "shard_00002.feats.npy.tmp").write_bytes(b"partial")
    (both / "manifest.json.x1y2.tmp").write_text("{")
    p0 = GradientStore.create_or_resume(both, process_index=0, process_count=2,
                                        **store_settings(dtype=dtype))
    assert not (both / "shard_00002.feats.npy.tmp").exists(), "own tmp leftover not cleaned"
    p0 = fill_store(both, process_index=0, process_count=2, dtype=dtype)
    assert p0.owned_shards == [0, 2] and p0.complete
    merged = GradientStore.merge(both)
    assert store_shard_bytes(both) == store_shard_bytes(reference), \
        "merged shards differ from one writer"
    assert store_manifest(both) == store_manifest(reference)
    np.testing.assert_array_equal(merged.feats(), GradientStore.open(reference).feats())


def test_concurrent_processes_and_merge_checks(tmp_path):
    reference = tmp_path / "one"
    fill_store(reference)
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold jax
    with ctx.Pool(2) as pool:
        done = pool.starmap(process_main, [(str(tmp_path / "two"), p, 2, "ab12") for p in (0, 1)])
    assert done == [0, 1]
    GradientStore.merge(tmp_path / "two")
    assert store_shard_bytes(tmp_path / "two") == store_shard_bytes(reference)
    assert store_manifest(tmp_path / "two") == store_manifest(reference)

    # A process run with another checkpoint is refused at once if the manifest is there...
    mixed = tmp_path / "mixed"
    process_main(str(mixed), 0, 2, "ab12")
    with pytest.raises(StoreMismatchError, match="checkpoint: expected"):
        process_main(str(mixed), 1, 2, "ff00")
    # ... and caught at merge if it started first and the other's manifest won the race.
    mixed, first = tmp_path / "mixed2", tmp_path / "first"
    process_main(str(mixed), 1, 2, "ff00")
    process_main(str(first), 0, 2, "ab12")
    os.replace(first / "manifest.json", mixed / "manifest.json")
    process_main(str(mixed), 0, 2, "ab12")
    with pytest.raises(StoreMismatchError, match=r"Process 1 (.|\n)*checkpoint: expected"):
        GradientStore.merge(mixed)
    with pytest.raises(StoreMismatchError, match=r"Process 1 (.|\n)*checkpoint: expected"):
        GradientStore.create_or_resume(mixed, **store_settings())  # one process resuming the rest

    # Shards a process never wrote are listed with their owner.
    partial = tmp_path / "partial"
    fill_store(partial, shards=[0, 2], process_index=0, process_count=2)
    fill_store(partial, shards=[1], process_index=1, process_count=2)
    with pytest.raises(IncompleteStoreError, match=r"\[3\]; by owning process: process 1: \[3\]"):
        GradientStore.merge(partial)
