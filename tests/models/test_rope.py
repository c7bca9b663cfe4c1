"""jaxgrad.models.rope: every rope type against torch on tiny random Llama models, its config.json
spellings (transformers 4's rope_scaling, legacy keys, the top-level original maximum position),
and unsupported ones refused by name."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from helpers.models import (ATOL, TINY, compare_decoder, copy_fixture, edit_config, max_err,
                            reference, refused, run, save_decoder)
from jaxgrad.models import config_from_hf, load_pretrained, rope as rope_lib


ROPES = {
    "linear": dict(rope_parameters={"rope_type": "linear", "factor": 2.0}),
    "dynamic": dict(max_position_embeddings=8,  # the 12-token batch grows past it
                    rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
    "yarn": dict(max_position_embeddings=32,
                 rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 8.0,
                                  "original_max_position_embeddings": 8, "rope_theta": 100.0}),
    "yarn_mscale": dict(max_position_embeddings=32,
                        rope_parameters={"rope_type": "yarn", "factor": 4.0, "mscale": 1.0,
                                         "mscale_all_dim": 0.5, "truncate": False,
                                         "original_max_position_embeddings": 8}),
    "longrope": dict(max_position_embeddings=32,
                     rope_parameters={"rope_type": "longrope", "original_max_position_embeddings": 8,
                                      "short_factor": [1.0, 1.5, 2.0, 2.5],
                                      "long_factor": [2.0, 3.0, 5.0, 9.0]}),
    "llama3": dict(max_position_embeddings=64,
                   rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8,
                                    "rope_theta": 500.0}),
    "proportional": dict(rope_parameters={"rope_type": "proportional", "partial_rotary_factor": 0.5,
                                          "factor": 2.0}),
}


@pytest.mark.parametrize("name", sorted(ROPES))
def test_rope_types_match_torch(tmp_path, name):
    d = save_decoder(tmp_path / "m", **ROPES[name])
    model, _, _ = compare_decoder(d)
    cfg = model.config
    inv, att = rope_lib.rope_frequencies(cfg, 12)
    plain, _ = rope_lib.rope_frequencies(dataclasses.replace(cfg, rope_type="default"), 12)
    assert np.abs(np.asarray(inv) - np.asarray(plain)).max() > 1e-4 or att != 1.0, \
        f"{name}: the rope scaling should change the frequencies"


def test_transformers4_rope_scaling_with_legacy_type_key(tmp_path):
    """`rope_scaling: {"type": ...}` + top-level `rope_theta` (transformers 4 configs)."""
    d = save_decoder(tmp_path / "m", rope_parameters={"rope_type": "linear", "factor": 3.0,
                                                       "rope_theta": 50.0})
    edit_config(d, rope_parameters=None, rope_scaling={"type": "linear", "factor": 3.0}, rope_theta=50.0)
    model, _, _ = compare_decoder(d)
    assert (model.config.rope_type, model.config.rope_factor, model.config.rope_theta) == \
        ("linear", 3.0, 50.0)


def test_top_level_original_max_position_embeddings_overrides(tmp_path):
    """standardize_rope_params: a top-level original_max_position_embeddings wins (llama3)."""
    d = save_decoder(tmp_path / "m", **ROPES["llama3"])
    edit_config(d, original_max_position_embeddings=4)
    model, _, _ = compare_decoder(d)
    assert model.config.rope_original_max_position == 4


def test_llama3_original_max_position_defaults_to_max_position_embeddings():
    cfg = config_from_hf({"model_type": "llama", **TINY, "max_position_embeddings": 99,
                          "rope_parameters": {"rope_type": "llama3", "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0}})
    assert cfg.rope_original_max_position == 99


def test_partial_rotary_factor_ignored_by_default_rope(tmp_path):
    """The family's own default rope ignores partial_rotary_factor: full rotation, as torch."""
    d = save_decoder(tmp_path / "m", partial_rotary_factor=0.5)
    compare_decoder(d)


@pytest.mark.parametrize("rope, field", [
    ({"rope_type": "su", "factor": 2.0}, "rope_parameters.rope_type"),
    ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}, "rope_parameters"),
    ({"full_attention": {"rope_type": "default"}}, "rope_parameters"),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]},
     "rope_parameters.short_factor"),
], ids=["unknown-type", "partial-linear", "llama3-missing-key", "nested", "longrope-length"])
def test_unsupported_rope_refused(tmp_path, rope, field):
    d = save_decoder(tmp_path / "m")
    edit_config(d, rope_parameters=rope)
    refused(d, field)


def test_transformers4_rope_scaling_fields_read(tmp_path):
    """`rope_theta` + `rope_scaling` (transformers 4) mean the same as `rope_parameters` (5)."""
    d = copy_fixture("tiny-llama", tmp_path)
    params = json.loads((d / "config.json").read_text())["rope_parameters"]
    theta = params.pop("rope_theta")
    edit_config(d, rope_parameters=None, rope_theta=theta, rope_scaling=params)
    model, _ = load_pretrained(str(d))
    ref = reference("tiny-llama")
    ours, mask = run(model, ref)
    assert max_err(ours, ref["logits"], mask) < ATOL
