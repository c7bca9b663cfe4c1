"""jaxgrad.gradients.manifest: a store resumed or opened with other settings than its manifest
records is refused, naming the field."""

from __future__ import annotations

import pytest

from helpers.stores import K, N, fill_store, store_settings
from jaxgrad.gradients.manifest import StoreMismatchError
from jaxgrad.gradients.store import GradientStore


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
    fill_store(tmp_path / "s", shards=[0])
    with pytest.raises(StoreMismatchError) as error:
        GradientStore.create_or_resume(tmp_path / "s", **store_settings(**override))
    message = str(error.value)
    assert f"  {field}: expected" in message, f"field {field} not named in: {message}"
    assert found_text in message, f"expected/found values missing from: {message}"
    assert "new store directory" in message and "delete" in message, "no way forward given"
    assert GradientStore.create_or_resume(tmp_path / "s", **store_settings()).missing_shards() == [
        1, 2, 3
    ], "a refused resume must leave the store as it was"


def test_open_refuses_other_settings(tmp_path):
    fill_store(tmp_path / "s")
    same = store_settings()
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
