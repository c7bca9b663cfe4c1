"""jaxgrad.train.stage: the base stage pretrains a Llama-family base only."""

from __future__ import annotations

import pytest

from configs import demo
from jaxgrad.pipeline import run_pipeline


def test_pretrained_base_must_be_llama(tmp_path):
    config = demo.get_config("tiny")
    config.model.family = "t5"
    with pytest.raises(ValueError, match="base.pretrain builds a Llama-family base.*'t5'"):
        run_pipeline(config, str(tmp_path), stages=["base"])
    assert not (tmp_path / "base").exists()
