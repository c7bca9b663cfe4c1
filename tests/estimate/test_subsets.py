"""jaxgrad.estimate.subsets: sampling distinct subsets of a given size (a fraction or a count),
and the per-sample masks of subsets of sources."""

from __future__ import annotations

import numpy as np
import pytest

from jaxgrad.estimate import subsets as subsets_lib


def test_sample_subsets_sizes_distinct_and_seeded():
    subsets = subsets_lib.sample_subsets(20, 300, 0.5, seed=3)
    assert subsets.shape == (300, 20) and subsets.dtype == bool
    assert np.all(subsets.sum(axis=1) == 10), "every subset must hold half of the 20 sources"
    assert len({row.tobytes() for row in subsets}) == 300, "subsets must be distinct"
    np.testing.assert_array_equal(subsets, subsets_lib.sample_subsets(20, 300, 0.5, seed=3))
    assert not np.array_equal(subsets, subsets_lib.sample_subsets(20, 300, 0.5, seed=4))
    assert np.all(subsets_lib.sample_subsets(7, 5, 3).sum(axis=1) == 3), "a count is a count"
    # 6 distinct subsets of 2 of 4 sources: asking for 5 draws 5 distinct ones, 9 repeats some.
    assert len({r.tobytes() for r in subsets_lib.sample_subsets(4, 5, 2)}) == 5
    with pytest.warns(UserWarning, match="only 6 distinct subsets"):
        many = subsets_lib.sample_subsets(4, 9, 2, seed=1)
    assert len({r.tobytes() for r in many}) == 6, "every distinct subset must appear"
    for bad in (0.0, 1.5, 0, 21):
        with pytest.raises(ValueError, match="size must be a fraction in \\[0, 1\\) or a whole|of only 20"):
            subsets_lib.sample_subsets(20, 3, bad)
    assert np.all(subsets_lib.sample_subsets(7, 5, 3.0).sum(axis=1) == 3), "3.0 is the count 3"
    with pytest.raises(TypeError, match="size must be"):
        subsets_lib.sample_subsets(20, 3, True)


def test_masks_from_sources():
    ids = np.array([2, 0, 1, 2, 3, 0])
    subsets = np.array([[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]], bool)
    masks = subsets_lib.masks_from_sources(ids, subsets)
    want = np.array([[subsets[s, i] for i in ids] for s in range(3)])
    np.testing.assert_array_equal(masks, want)
    np.testing.assert_array_equal(subsets_lib.masks_from_sources(ids, [[0, 2], [3], []]), want)
    with pytest.raises(ValueError, match=r"subset 1 names unknown source\(s\) \[4\]"):
        subsets_lib.masks_from_sources(ids, [[0], [4]])
    with pytest.raises(ValueError, match="names source 3 but the subsets cover only 3 sources"):
        subsets_lib.masks_from_sources(ids, subsets[:, :3])
    with pytest.raises(ValueError, match="1-D array of ints"):
        subsets_lib.masks_from_sources(ids.astype(float), subsets)
