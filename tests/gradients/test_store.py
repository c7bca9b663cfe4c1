"""jaxgrad.gradients.store: the layout of a store, reading it back in every storage dtype, rows by
example id and by source (reading only the shards needed), and what counts as missing.

The stores are written by hand with helpers.stores (11 rows of k = 6 in shards of 3)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import jaxgrad
from helpers.stores import K, N, SOURCES, fill_store, store_data, store_settings
from jaxgrad.gradients.manifest import IncompleteStoreError
from jaxgrad.gradients.store import GradientStore


def _bf16_round(x_f32: np.ndarray) -> np.ndarray:
    """Independent bfloat16 reference: round-to-nearest-even on the float32 bits."""
    bits = x_f32.astype(np.float32).view(np.uint32).astype(np.uint64)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


def test_manifest_and_layout(tmp_path):
    store = fill_store(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["example_ids"] == store_settings()["example_ids"], "row order not recorded"
    assert manifest["source_ids"] == SOURCES
    assert manifest["num_shards"] == 4 and manifest["num_examples"] == N
    assert manifest["jaxgrad_version"] == jaxgrad.__version__
    assert manifest["projector"] == store_settings()["projector"]
    assert manifest["checkpoint"]["sha256"] == "ab12"
    assert manifest["output_fn"] == {"name": "logit_odds", "eps": 1e-6}
    assert {"created", "format_version", "dtype", "split", "model", "k"} <= manifest.keys()
    assert [store.shard_rows(i) for i in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 11)]
    names = sorted(os.listdir(tmp_path / "s"))
    assert names == ["manifest.json"] + [
        f"shard_{i:05d}.{kind}.npy" for i in range(4) for kind in ("f", "feats")
    ], f"unexpected files in the store: {names}"
    assert np.load(tmp_path / "s" / "shard_00003.feats.npy").shape == (2, K)
    assert store.complete and store.missing_shards() == []


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_roundtrip_each_dtype(tmp_path, dtype):
    feats, f = store_data()
    fill_store(tmp_path / "s", dtype=dtype)
    store = GradientStore.open(tmp_path / "s")
    got_feats, got_f = store.feats(), store.f()
    assert got_feats.dtype == np.float32 and got_f.dtype == np.float32, "reads must be float32"
    assert got_feats.shape == (N, K) and got_f.shape == (N,)
    if dtype == "float32":
        np.testing.assert_array_equal(got_feats, feats, err_msg="float32 must be exact")
        np.testing.assert_array_equal(got_f, f)
    elif dtype == "float16":
        # Unit roundoff of float16 is 2^-11 for values in its normal range.
        np.testing.assert_array_less(np.abs(got_feats - feats), 2.0**-11 * np.abs(feats) + 1e-12)
        np.testing.assert_array_less(np.abs(got_f - f), 2.0**-11 * np.abs(f) + 1e-12)
    else:
        np.testing.assert_array_equal(
            got_feats, _bf16_round(feats), err_msg="bfloat16 must round to nearest even"
        )
        np.testing.assert_array_equal(got_f, _bf16_round(f))
        np.testing.assert_array_less(np.abs(got_feats - feats), 2.0**-8 * np.abs(feats) + 1e-12)
    full = 4 if dtype == "float32" else 2
    size = os.path.getsize(tmp_path / "s" / "shard_00000.feats.npy")
    assert size == 128 + 3 * K * full, f"{dtype} shard is {size} bytes, expected {full} per value"
    feats_1, f_1 = store.read_shard(1)
    np.testing.assert_array_equal(feats_1, got_feats[3:6])
    np.testing.assert_array_equal(f_1, got_f[3:6])


def test_feats_for_ids_and_sources(tmp_path):
    feats, f = store_data()
    store = fill_store(tmp_path / "s")
    ids = store.example_ids
    wanted = ["ex09", "ex00", "ex05", "ex09", "ex03"]  # unordered, across shards, a repeat
    rows = [ids.index(e) for e in wanted]
    got_feats, got_f, got_ids = store.feats_for(example_ids=wanted)
    np.testing.assert_array_equal(got_feats, feats[rows], err_msg="rows not in requested order")
    np.testing.assert_array_equal(got_f, f[rows])
    assert got_ids == wanted

    assert store.sources == ["alpaca", "cot", "flan", 7], "sources in first-appearance order"
    np.testing.assert_array_equal(store.rows_for_source("flan"), [3, 7, 8])
    got_feats, got_f, got_ids = store.feats_for(sources=["flan", "alpaca"])
    rows = [3, 7, 8, 0, 2, 6]
    np.testing.assert_array_equal(got_feats, feats[rows])
    np.testing.assert_array_equal(got_f, f[rows])
    assert got_ids == [ids[r] for r in rows]

    all_feats, all_f, all_ids = store.feats_for()
    np.testing.assert_array_equal(all_feats, feats)
    assert all_ids == ids
    with pytest.raises(ValueError, match="ex99"):
        store.feats_for(example_ids=["ex01", "ex99"])
    with pytest.raises(ValueError, match="source 'web'"):
        store.feats_for(sources=["web"])
    with pytest.raises(ValueError, match="not both"):
        store.feats_for(example_ids=["ex01"], sources=["cot"])


def test_feats_for_reads_only_needed_shards(tmp_path):
    feats, _ = store_data()
    store = GradientStore.open(fill_store(tmp_path / "s").path)
    os.remove(tmp_path / "s" / "shard_00002.feats.npy")  # rows 6..8 gone after opening
    got, _, _ = store.feats_for(example_ids=["ex10", "ex01"])  # shards 3 and 0
    np.testing.assert_array_equal(got, feats[[10, 1]])
    with pytest.raises(IncompleteStoreError, match=r"shards \[2\]"):
        store.feats_for(example_ids=["ex07"])


def test_truncated_shard_file_counts_as_missing(tmp_path):
    store = fill_store(tmp_path / "s")
    name = tmp_path / "s" / "shard_00001.feats.npy"
    name.write_bytes(name.read_bytes()[:-4])
    assert store.missing_shards() == [1]
    np.save(name, np.zeros((3, K + 1), np.float32))  # complete file, wrong shape
    assert store.missing_shards() == [1]
    np.save(name, np.zeros((3, K), np.float64))  # wrong dtype
    assert store.missing_shards() == [1]


def test_incomplete_store_refused_on_open(tmp_path):
    fill_store(tmp_path / "s", shards=[0, 2])
    with pytest.raises(IncompleteStoreError, match=r"2 of 4 shards are missing: \[1, 3\]"):
        GradientStore.open(tmp_path / "s")
    store = GradientStore.create_or_resume(tmp_path / "s", **store_settings())
    with pytest.raises(IncompleteStoreError, match="missing"):
        store.feats()
