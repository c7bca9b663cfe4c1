"""Tests for jaxgrad/gradients/store.py: the resumable, memory-mapped gradient store."""

from __future__ import annotations

import json
import multiprocessing
import os

import numpy as np
import pytest

import jaxgrad
from jaxgrad.gradients.manifest import IncompleteStoreError, StoreMismatchError
from jaxgrad.gradients.store import GradientStore

N, K, SHARD = 11, 6, 3  # 4 shards, the last one with 2 rows
SOURCES = ["alpaca", "cot", "alpaca", "flan", "cot", "cot", "alpaca", "flan", "flan", "cot", 7]


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The reference rows: magnitudes in [0.5, 4) so float16 stays in its normal range."""
    rng = np.random.default_rng(seed)
    sign = rng.choice([-1.0, 1.0], size=(N, K + 1))
    values = sign * rng.uniform(0.5, 4.0, size=(N, K + 1))
    return values[:, :K].astype(np.float32), values[:, K].astype(np.float32)


def _settings(**overrides):
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


def _fill(path, shards=None, seed=0, process_index=0, process_count=1, **overrides):
    """create_or_resume + write the given (default: all missing) shards; returns the store."""
    feats, f = _data(seed)
    store = GradientStore.create_or_resume(
        path, process_index=process_index, process_count=process_count, **_settings(**overrides)
    )
    for i in store.missing_shards() if shards is None else shards:
        start, stop = store.shard_rows(i)
        store.write_shard(i, feats[start:stop], f[start:stop])
    return store


def _shard_bytes(path) -> dict[str, bytes]:
    return {
        name: open(os.path.join(path, name), "rb").read()
        for name in sorted(os.listdir(path))
        if name != "manifest.json"
    }


def _manifest(path) -> dict:
    with open(os.path.join(path, "manifest.json")) as fh:
        manifest = json.load(fh)
    manifest.pop("created")
    return manifest


def _bf16_round(x_f32: np.ndarray) -> np.ndarray:
    """Independent bfloat16 reference: round-to-nearest-even on the float32 bits."""
    bits = x_f32.astype(np.float32).view(np.uint32).astype(np.uint64)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


def test_manifest_and_layout(tmp_path):
    store = _fill(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["example_ids"] == _settings()["example_ids"], "row order not recorded"
    assert manifest["source_ids"] == SOURCES
    assert manifest["num_shards"] == 4 and manifest["num_examples"] == N
    assert manifest["jaxgrad_version"] == jaxgrad.__version__
    assert manifest["projector"] == _settings()["projector"]
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
    feats, f = _data()
    _fill(tmp_path / "s", dtype=dtype)
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
    feats, f = _data()
    store = _fill(tmp_path / "s")
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
    feats, _ = _data()
    store = GradientStore.open(_fill(tmp_path / "s").path)
    os.remove(tmp_path / "s" / "shard_00002.feats.npy")  # rows 6..8 gone after opening
    got, _, _ = store.feats_for(example_ids=["ex10", "ex01"])  # shards 3 and 0
    np.testing.assert_array_equal(got, feats[[10, 1]])
    with pytest.raises(IncompleteStoreError, match=r"shards \[2\]"):
        store.feats_for(example_ids=["ex07"])


def test_resume_after_crash_matches_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    _fill(reference)
    crashed = tmp_path / "crashed"
    store = _fill(crashed, shards=[0, 1, 3])
    # Shard 2: killed while writing (a temporary file only).
    (crashed / "shard_00002.feats.npy.tmp").write_bytes(b"\x93NUMPY half a shard")
    # Shard 3: only one of its two files survived.
    os.remove(crashed / "shard_00003.feats.npy")
    assert not store.complete
    with pytest.raises(IncompleteStoreError, match=r"2 of 4 shards are missing: \[2-3\]"):
        GradientStore.open(crashed)

    resumed = GradientStore.create_or_resume(crashed, **_settings())
    assert resumed.missing_shards() == [2, 3], "partial shards must count as missing"
    assert not (crashed / "shard_00002.feats.npy.tmp").exists(), "tmp leftover not cleaned"
    _fill(crashed)
    assert _shard_bytes(crashed) == _shard_bytes(reference), "resumed shards differ"
    assert _manifest(crashed) == _manifest(reference)


def test_truncated_shard_file_counts_as_missing(tmp_path):
    store = _fill(tmp_path / "s")
    name = tmp_path / "s" / "shard_00001.feats.npy"
    name.write_bytes(name.read_bytes()[:-4])
    assert store.missing_shards() == [1]
    np.save(name, np.zeros((3, K + 1), np.float32))  # complete file, wrong shape
    assert store.missing_shards() == [1]
    np.save(name, np.zeros((3, K), np.float64))  # wrong dtype
    assert store.missing_shards() == [1]


@pytest.mark.parametrize(
    "field, override, found_text",
    [
        ("projector", {"projector": {"kind": "rademacher", "seed": 4, "dim": 1000, "k": K}},
         '"seed": 3'),
        ("checkpoint", {"checkpoint": {"path": "/ckpt/meta", "sha256": "ff00"}}, "ab12"),
        ("output_fn", {"output_fn": "token_ce"}, "logit_odds"),
        ("k", {"k": K + 1, "projector": {"kind": "rademacher", "seed": 3, "dim": 1000,
                                          "k": K + 1}}, "found 6"),
        ("dtype", {"dtype": "bfloat16"}, '"float32"'),
        ("example_ids", {"example_ids": [f"ex{r:02d}" for r in range(N - 1)] + ["other"]},
         "first difference at row 10: expected 'other', found 'ex10'"),
    ],
)
def test_resume_refuses_other_settings(tmp_path, field, override, found_text):
    _fill(tmp_path / "s", shards=[0])
    with pytest.raises(StoreMismatchError) as error:
        GradientStore.create_or_resume(tmp_path / "s", **_settings(**override))
    message = str(error.value)
    assert f"  {field}: expected" in message, f"field {field} not named in: {message}"
    assert found_text in message, f"expected/found values missing from: {message}"
    assert "new store directory" in message and "delete" in message, "no way forward given"
    assert GradientStore.create_or_resume(tmp_path / "s", **_settings()).missing_shards() == [
        1, 2, 3
    ], "a refused resume must leave the store as it was"


def test_open_refuses_other_settings(tmp_path):
    _fill(tmp_path / "s")
    same = _settings()
    store = GradientStore.open(
        tmp_path / "s",
        projector=same["projector"],
        checkpoint=same["checkpoint"],
        output_fn=same["output_fn"],
    )
    assert store.complete
    with pytest.raises(StoreMismatchError, match=r"checkpoint: expected .*ff00.*found .*ab12"):
        GradientStore.open(tmp_path / "s", checkpoint={"path": "/ckpt/meta", "sha256": "ff00"})
    with pytest.raises(StoreMismatchError, match="projector: expected"):
        GradientStore.open(tmp_path / "s", projector={"kind": "gaussian", "seed": 3})
    with pytest.raises(FileNotFoundError, match="not a gradient store"):
        GradientStore.open(tmp_path / "nothing_here")


def test_incomplete_store_refused_on_open(tmp_path):
    _fill(tmp_path / "s", shards=[0, 2])
    with pytest.raises(IncompleteStoreError, match=r"2 of 4 shards are missing: \[1, 3\]"):
        GradientStore.open(tmp_path / "s")
    store = GradientStore.create_or_resume(tmp_path / "s", **_settings())
    with pytest.raises(IncompleteStoreError, match="missing"):
        store.feats()


def test_nonfinite_rows_refused(tmp_path):
    feats, f = _data()
    store = GradientStore.create_or_resume(tmp_path / "s", **_settings())
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

    half = GradientStore.create_or_resume(tmp_path / "h", **_settings(dtype="float16"))
    with pytest.raises(ValueError, match="beyond the range of the storage dtype float16"):
        half.write_shard(0, feats[0:3] * 1e5, f[0:3])


def test_write_shard_checks_input(tmp_path):
    feats, f = _data()
    store = GradientStore.create_or_resume(tmp_path / "s", **_settings())
    with pytest.raises(ValueError, match=r"shape \(rows, k\) = \(2, 6\)"):
        store.write_shard(3, feats[9:12, :5], f[9:11])
    with pytest.raises(ValueError, match=r"shape \(rows,\) = \(3,\)"):
        store.write_shard(0, feats[0:3], f[0:4])
    with pytest.raises(TypeError, match="floating"):
        store.write_shard(0, np.ones((3, K), np.int32), f[0:3])
    with pytest.raises(ValueError, match="out of range"):
        store.write_shard(4, feats[0:3], f[0:3])
    with pytest.raises(ValueError, match="read-only"):
        _fill(tmp_path / "t")
        GradientStore.open(tmp_path / "t").write_shard(0, feats[0:3], f[0:3])
    other = GradientStore.create_or_resume(
        tmp_path / "p", process_index=1, process_count=2, **_settings()
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
        GradientStore.create_or_resume(tmp_path / "s", **_settings(**override))
    with pytest.raises(ValueError, match="process_index must be in"):
        GradientStore.create_or_resume(tmp_path / "s", process_index=2, process_count=2,
                                       **_settings())


def test_shards_without_manifest_refused(tmp_path):
    _fill(tmp_path / "s", shards=[0])
    os.remove(tmp_path / "s" / "manifest.json")
    with pytest.raises(StoreMismatchError, match="shard files but no manifest.json"):
        GradientStore.create_or_resume(tmp_path / "s", **_settings())


def _process_main(path: str, process_index: int, process_count: int, checkpoint_hash: str):
    """One writer of a multi-process store (run in its own process)."""
    _fill(path, process_index=process_index, process_count=process_count,
          checkpoint={"path": "/ckpt/meta", "sha256": checkpoint_hash})
    return process_index


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_processes_give_the_same_store_as_one(tmp_path, dtype):
    reference = tmp_path / "one"
    _fill(reference, dtype=dtype)
    both = tmp_path / "two"
    # Process 1 first, so it also meets a directory without a manifest; then the other order.
    p1 = _fill(both, process_index=1, process_count=2, dtype=dtype)
    assert p1.owned_shards == [1, 3] and p1.missing_shards() == []
    with pytest.raises(IncompleteStoreError, match="not merged"):
        GradientStore.open(both)
    with pytest.raises(IncompleteStoreError, match=r"process\(es\) \[0\] of 2 never started"):
        GradientStore.merge(both)
    # Leftovers of a crashed process 0: its own shard's tmp and a manifest being written.
    (both / "shard_00002.feats.npy.tmp").write_bytes(b"partial")
    (both / "manifest.json.x1y2.tmp").write_text("{")
    p0 = GradientStore.create_or_resume(both, process_index=0, process_count=2,
                                        **_settings(dtype=dtype))
    assert not (both / "shard_00002.feats.npy.tmp").exists(), "own tmp leftover not cleaned"
    p0 = _fill(both, process_index=0, process_count=2, dtype=dtype)
    assert p0.owned_shards == [0, 2] and p0.complete
    merged = GradientStore.merge(both)
    assert _shard_bytes(both) == _shard_bytes(reference), "merged shards differ from one writer"
    assert _manifest(both) == _manifest(reference)
    np.testing.assert_array_equal(merged.feats(), GradientStore.open(reference).feats())


def test_concurrent_processes_and_merge_checks(tmp_path):
    reference = tmp_path / "one"
    _fill(reference)
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold jax
    with ctx.Pool(2) as pool:
        done = pool.starmap(_process_main, [(str(tmp_path / "two"), p, 2, "ab12") for p in (0, 1)])
    assert done == [0, 1]
    GradientStore.merge(tmp_path / "two")
    assert _shard_bytes(tmp_path / "two") == _shard_bytes(reference)
    assert _manifest(tmp_path / "two") == _manifest(reference)

    # A process run with another checkpoint is refused at once if the manifest is there...
    mixed = tmp_path / "mixed"
    _process_main(str(mixed), 0, 2, "ab12")
    with pytest.raises(StoreMismatchError, match="checkpoint: expected"):
        _process_main(str(mixed), 1, 2, "ff00")
    # ... and caught at merge if it started first and the other's manifest won the race.
    mixed, first = tmp_path / "mixed2", tmp_path / "first"
    _process_main(str(mixed), 1, 2, "ff00")
    _process_main(str(first), 0, 2, "ab12")
    os.replace(first / "manifest.json", mixed / "manifest.json")
    _process_main(str(mixed), 0, 2, "ab12")
    with pytest.raises(StoreMismatchError, match=r"Process 1 (.|\n)*checkpoint: expected"):
        GradientStore.merge(mixed)
    with pytest.raises(StoreMismatchError, match=r"Process 1 (.|\n)*checkpoint: expected"):
        GradientStore.create_or_resume(mixed, **_settings())  # one process resuming the rest

    # Shards a process never wrote are listed with their owner.
    partial = tmp_path / "partial"
    _fill(partial, shards=[0, 2], process_index=0, process_count=2)
    _fill(partial, shards=[1], process_index=1, process_count=2)
    with pytest.raises(IncompleteStoreError, match=r"\[3\]; by owning process: process 1: \[3\]"):
        GradientStore.merge(partial)
