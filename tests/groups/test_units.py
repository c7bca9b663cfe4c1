"""jaxgrad.groups.units: the groups section's checks, units made of clusters of chosen sources and
whole other sources, their sample ids and rows, and empty k-means clusters dropped."""

from __future__ import annotations

import numpy as np
import pytest

from jaxgrad.groups.units import (AGGLOMERATIVE_MAX_SAMPLES, GroupsSpec, Units, cluster_names,
                                  make_groups)


def _store(seed=0):
    """Three sources; ``a`` and ``b`` hold two planted directions each (norms over 3 decades)."""
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(4, 16))
    feats, ids, srcs, truth = [], [], [], []
    for i in range(40):
        d = i % 4
        src = "a" if d < 2 else "b"
        feats.append(dirs[d] * 10.0 ** rng.uniform(-1.5, 1.5) + 0.01 * rng.normal(size=16))
        ids.append(f"{src}/{i}")
        srcs.append(src)
        truth.append(d)
    for i in range(7):
        feats.append(rng.normal(size=16))
        ids.append(f"c/{i}")
        srcs.append("c")
        truth.append(-1)
    return np.array(feats), ids, srcs, np.array(truth)


@pytest.mark.parametrize("method", ["agglomerative", "kmeans"])
def test_clusters_of_chosen_sources_and_whole_others(method):
    feats, ids, srcs, truth = _store()
    spec = GroupsSpec.from_config(dict(by="cluster", sources=("a", "b"), num_clusters=4,
                                       method=method))
    rec = make_groups(spec, feats, ids, srcs, ["a", "b", "c"])
    names = [u["name"] for u in rec["units"]]
    assert names == ["c00", "c01", "c02", "c03", "c"], names
    got = {frozenset(u["example_ids"]) for u in rec["units"][:4]}
    want = {frozenset(np.array(ids)[truth == d]) for d in range(4)}
    assert got == want, f"{method}: the clusters are not the planted directions"
    assert rec["units"][4]["example_ids"] == [f"c/{i}" for i in range(7)]
    assert rec["units"][4]["kind"] == "source" and rec["units"][0]["kind"] == "cluster"
    assert rec["clustered_sources"] == ["a", "b"]


def test_units_map_rows_and_examples():
    feats, ids, srcs, truth = _store()
    rec = make_groups(GroupsSpec(by="cluster", num_clusters=3), feats, ids, srcs, ["a", "b", "c"])
    units = Units.from_record(rec)
    rows = units.row_ids(ids, srcs)
    for i, u in enumerate(rec["units"]):
        assert sorted(np.array(ids)[rows == i]) == sorted(u["example_ids"])
    with pytest.raises(ValueError, match="belong to no unit"):
        units.row_ids(ids + ["z/0"], srcs + ["z"])

    class Data:  # the one method Units.examples reads
        def examples(self, split, sources=None):
            return [{"example_id": e, "source": s} for e, s in zip(ids, srcs)]

    picked = units.examples(Data(), "train", ["c01"])
    assert [e["example_id"] for e in picked] == [e for e in ids if e in rec["units"][1]["example_ids"]]
    with pytest.raises(ValueError, match="unknown units"):
        units.examples(Data(), "train", ["c99"])
    assert units.kinds({"a": "target", "b": "related", "c": "noisy"})["c00"] in (
        "target", "related", "noisy", "mixed")
    by_source = Units.of_sources(["a", "b", "c"])
    assert by_source.row_ids(ids, srcs).tolist() == [["a", "b", "c"].index(s) for s in srcs]


def test_groups_section_refusals():
    with pytest.raises(ValueError, match=r"config.groups: unknown keys \['num_cluster'\]"):
        GroupsSpec.from_config(dict(num_cluster=3))
    with pytest.raises(ValueError, match="config.groups.by must be one of"):
        GroupsSpec.from_config(dict(by="clusters"))
    with pytest.raises(ValueError, match="config.groups.metric must be one of"):
        GroupsSpec.from_config(dict(metric="euclidean"))
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="config.groups.num_clusters must be a whole number"):
            GroupsSpec.from_config(dict(num_clusters=bad))
    assert GroupsSpec.from_config(dict(sources="a, b")).sources == ("a", "b")
    spec = GroupsSpec(by="cluster", num_clusters=3)
    n = AGGLOMERATIVE_MAX_SAMPLES + 1
    with pytest.raises(ValueError, match=r"needs their .* pairwise distances .*Use groups.method = "
                                         r"'kmeans'"):
        spec.check({"a": n})
    GroupsSpec(by="cluster", num_clusters=3, method="kmeans").check({"a": n})  # no N×N: allowed
    with pytest.raises(ValueError, match=r"cluster names \['c01'\] are also names of unclustered"):
        GroupsSpec(by="cluster", sources=("a",), num_clusters=3).check({"a": 10, "c01": 5})
    GroupsSpec().check({"a": 1})  # by = "source": nothing to check
    with pytest.raises(ValueError, match=r"groups.sources = \['a'\] is read only with groups.by"):
        GroupsSpec(sources=("a",)).check({"a": 1})  # set but not read: refused, not ignored
    from jaxgrad.pipeline.finetune import finetune_sources

    with pytest.raises(ValueError, match="set finetune.groups_file="):
        finetune_sources({"sources": "c01,c03"}, ["add", "copy"])
    assert cluster_names(3) == ["c00", "c01", "c02"] and cluster_names(101)[-1] == "c100"


def test_empty_kmeans_clusters_are_dropped_and_zero_gradients_named():
    rng = np.random.default_rng(0)
    dirs = rng.normal(size=(3, 8))
    feats = np.repeat(dirs, 4, axis=0)  # 12 rows, 3 distinct directions, 5 clusters asked for
    ids, srcs = [f"a/{i}" for i in range(12)], ["a"] * 12
    rec = make_groups(GroupsSpec(by="cluster", num_clusters=5, method="kmeans"), feats, ids, srcs,
                      ["a"])
    sizes = [u["size"] for u in rec["units"]]
    assert all(n > 0 for n in sizes) and sum(sizes) == 12, sizes
    assert rec["clusters_made"] == len(sizes) and [u["name"] for u in rec["units"]] == \
        cluster_names(len(sizes))
    feats[5] = 0.0
    with pytest.raises(ValueError, match=r"1 train samples have a projected gradient of norm 0.*"
                                         r"a/5"):
        make_groups(GroupsSpec(by="cluster", num_clusters=3), feats, ids, srcs, ["a"])


def test_cluster_units_refuse_other_splits_and_missing_samples():
    units = Units.from_record({"units": [{"name": "c00", "example_ids": ["a/0", "a/1"],
                                          "sources": {"a": 2}, "size": 2}]})

    class Data:
        def examples(self, split, sources=None):
            return [{"example_id": "a/0", "source": "a"}]

    with pytest.raises(ValueError, match="hold train samples only"):
        units.examples(Data(), "validation", ["c00"])
    with pytest.raises(ValueError, match=r"1 samples of units \['c00'\] are not in the data"):
        units.examples(Data(), "train", ["c00"])
