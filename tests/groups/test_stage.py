"""groups.by = "cluster" through the pipeline (jaxgrad.groups.stage, and the stages that select
among its units): the tiny run with its train samples in 6 clusters, the estimates and forward
selection over them, the final fine-tunes on their samples, the report, resuming, and the
groups settings refused before any stage."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil

import numpy as np
import pytest

from configs import demo
from helpers.runs import greedy_by_hand
from jaxgrad.pipeline import ConfigChangedError, run_pipeline


def _cluster_config(**groups):
    config = demo.get_config("tiny")
    config.groups.by = "cluster"
    config.groups.num_clusters = 6
    for key, value in groups.items():
        config.groups[key] = value
    config.selection.method = "forward"
    config.pipeline.finetune_runs = ("selection", "random")
    return config


@pytest.fixture(scope="module")
def cluster_dir(run_dir, tmp_path_factory):
    """The tiny run with its train samples in 6 clusters, forward selection among them."""
    workdir = str(tmp_path_factory.mktemp("clusters") / "run")
    shutil.copytree(run_dir, workdir)
    run_pipeline(_cluster_config(), workdir, on_config_change="rerun")
    return workdir


def test_clusters_are_scipys_average_linkage_on_the_stored_gradients(cluster_dir):
    from scipy.cluster.hierarchy import cut_tree, linkage
    from scipy.spatial.distance import pdist

    from jaxgrad.gradients.store import GradientStore

    groups = json.load(open(os.path.join(cluster_dir, "groups", "groups.json")))
    train = GradientStore.open(os.path.join(cluster_dir, "gradients", "train"))
    feats = np.asarray(train.feats(), np.float64)  # every train source is clustered (default)
    labels = cut_tree(linkage(pdist(feats, "cosine"), "average"), n_clusters=6).reshape(-1)
    want = {frozenset(np.asarray(train.example_ids)[labels == c]) for c in range(6)}
    got = {frozenset(u["example_ids"]) for u in groups["units"]}
    assert got == want, "groups.json is not scipy's average-linkage cut of the store's rows"
    assert [u["name"] for u in groups["units"]] == [f"c0{i}" for i in range(6)]
    assert all(u["size"] == len(u["example_ids"]) == sum(u["sources"].values())
               for u in groups["units"])


def test_estimates_and_forward_selection_over_clusters(cluster_dir):
    """The estimates fit each subset of clusters on exactly their samples; selection.method =
    "forward" is greedy forward selection (by hand) on the surrogate over the clusters."""
    from jaxgrad.estimate.scorer import SurrogateScorer
    from jaxgrad.rundir import resolved_config

    config = _cluster_config()
    groups = json.load(open(os.path.join(cluster_dir, "groups", "groups.json")))
    size = {u["name"]: u["size"] for u in groups["units"]}
    units = list(size)
    with open(os.path.join(cluster_dir, "estimates", "estimates.csv")) as f:
        rows = list(csv.DictReader(f))
    assert rows and all(int(r["n_samples"]) == sum(size[u] for u in json.loads(r["sources"]))
                        for r in rows)
    out = json.load(open(os.path.join(cluster_dir, "selection", "selection.json")))
    assert out["sources"] == units and out["groups"]["sizes"] == [size[u] for u in units]
    scorer = SurrogateScorer(resolved_config(config, cluster_dir), cluster_dir, units)
    score = lambda rows: -np.asarray(scorer(np.asarray(rows, bool))["loss"])  # noqa: E731
    want, _ = greedy_by_hand(score, units, 3)  # selection.top = 0.5 of 6 units
    assert out["stepwise"]["order"] == want
    assert out["selected"] == [u for u in units if u in want]


def test_finetunes_train_on_the_clusters_samples_and_report_shows_them(cluster_dir):
    out = json.load(open(os.path.join(cluster_dir, "selection", "selection.json")))
    groups = json.load(open(os.path.join(cluster_dir, "groups", "groups.json")))
    size = {u["name"]: u["size"] for u in groups["units"]}
    for name in ("selection", "random"):
        run = json.load(open(os.path.join(cluster_dir, "finetune", name, "sources.json")))
        want = out["selected"] if name == "selection" else out["baselines"]["random"]
        assert run["sources"] == want and run["n_train"] == sum(size[u] for u in want), name
    report = open(os.path.join(cluster_dir, "report.md")).read()
    assert "Target: **add**. Units: 6" in report  # not the first cluster of kind "target"
    assert "## Clusters" in report and os.path.isfile(os.path.join(cluster_dir, "clusters.png"))
    for u in groups["units"]:
        assert re.search(rf"\| {u['name']} \| {u['size']} \|", report), u["name"]


def test_clusters_resume_and_a_changed_clustering_is_refused(cluster_dir, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(cluster_dir, workdir)
    stamp = os.path.getmtime(os.path.join(workdir, "groups", "groups.json"))
    out = run_pipeline(_cluster_config(), workdir)
    assert os.path.getmtime(os.path.join(workdir, "groups", "groups.json")) == stamp
    assert out["groups"]["units"] == 6
    with pytest.raises(ConfigChangedError, match=r"groups.num_clusters: 6 → 5") as e:
        run_pipeline(_cluster_config(num_clusters=5), workdir)
    assert e.value.stage == "groups"
    # Back to whole sources: the estimates made over clusters are stale.
    with pytest.raises(ConfigChangedError, match="groups.by"):
        run_pipeline(demo.get_config("tiny"), workdir, stages=["estimates"])


def test_bad_groups_settings_refused_before_any_stage(tmp_path):
    for groups, match in ((dict(num_clusters=97), r"num_clusters = 97 is more than the 96 train"),
                          (dict(method="ward"), r"config.groups.method must be one of"),
                          (dict(sources=("nope",)), r"config.groups.sources: unknown sources")):
        with pytest.raises(ValueError, match=match):
            run_pipeline(_cluster_config(**groups), str(tmp_path / "run"))
        assert not os.path.exists(tmp_path / "run" / "meta_train")
