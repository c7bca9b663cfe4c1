"""jaxgrad.gradients.stage: a run directory's gradient stores record its own base model relative to
it, so a copied run directory resumes an interrupted store."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from configs import demo
from jaxgrad.pipeline import run_pipeline


def test_moved_run_directory_resumes_an_interrupted_gradient_store(run_dir, tmp_path):
    """A store records the run directory's own base model (the demo's <workdir>/base) relative to
    the run directory, so a copied run directory whose gradients stage was interrupted resumes
    it (with the absolute path recorded, resuming failed: StoreMismatchError on `model`)."""
    from jaxgrad.gradients.store import GradientStore

    moved = str(tmp_path / "moved")
    shutil.copytree(run_dir, moved)
    store = os.path.join(moved, "gradients", "train")
    with open(os.path.join(store, "manifest.json")) as f:
        assert json.load(f)["model"] == "base"
    removed = [f for f in os.listdir(store) if f.startswith("shard_")]
    assert removed
    for f in removed:  # "interrupted" before any shard was written
        os.remove(os.path.join(store, f))
    run_pipeline(demo.get_config("tiny"), moved, stages=["gradients"])
    original = GradientStore.open(os.path.join(run_dir, "gradients", "train"))
    resumed = GradientStore.open(store)
    assert resumed.complete and resumed.example_ids == original.example_ids
    np.testing.assert_allclose(resumed.feats(), original.feats(), rtol=0,
                               atol=1e-5 * np.abs(original.feats()).max())
