"""jaxgrad.models.lora: adapters on the committed fixtures (B = 0 leaves the logits unchanged, A is
random), trainable parameter counts, T5's targets, dropout only with an rng, unknown targets
refused, and LoraConfig's selection, rank and alpha rules against PEFT's."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from helpers import fixture
from helpers.models import ALL, reference, run
from jaxgrad.models import (LoraConfig, apply_lora, load_peft_adapter, load_pretrained, lora_state,
                            num_params, trainable_summary)


@pytest.mark.parametrize("name", ALL)
def test_lora_with_zero_b_leaves_logits_unchanged(name):
    model, _ = load_pretrained(fixture(name))
    ref = reference(name)
    before, mask = run(model, ref)
    apply_lora(model, LoraConfig(rank=4, alpha=16, seed=3))
    after, _ = run(model, ref)
    np.testing.assert_array_equal(after, before, err_msg="B = 0 must leave the base model's logits unchanged")
    assert all(np.any(np.asarray(v) != 0) for k, v in jax.tree_util.tree_leaves_with_path(lora_state(model))
               if "lora_A" in jax.tree_util.keystr(k)), "lora_A should be randomly initialised"


def test_trainable_parameter_count():
    model, _ = load_pretrained(fixture("tiny-llama"), lora=LoraConfig(rank=4, alpha=8))
    # q: 32->32, k: 32->16, v: 32->16 (2 kv heads of 8) per layer, 2 layers: r*(in+out) each.
    expected = 2 * 4 * ((32 + 32) + (32 + 16) + (32 + 16))
    assert num_params(lora_state(model)) == expected
    summary = trainable_summary(model)
    assert summary["lora_params"] == expected and 0 < summary["lora_fraction"] < 0.1


def test_t5_targets_match_self_and_cross_attention():
    model, _ = load_pretrained(fixture("tiny-t5"), lora=LoraConfig(rank=2))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(lora_state(model))]
    assert any("EncDecAttention" in p for p in paths) and any("SelfAttention" in p for p in paths)
    # q, k, v in 2 encoder self-attn + 2 decoder self-attn + 2 decoder cross-attn, A and B each.
    assert len(paths) == 3 * 6 * 2


def test_lora_dropout_only_with_rng():
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")  # those of the peft fixture
    model, _ = load_pretrained(fixture("tiny-llama"),
                               lora=LoraConfig(rank=4, dropout=0.5, target_modules=targets))
    load_peft_adapter(model, os.path.join(fixture("tiny-llama"), "peft_adapter"))
    ref = reference("tiny-llama")
    a = np.asarray(model(ref["input_ids"], ref["attention_mask"]))
    b = np.asarray(model(ref["input_ids"], ref["attention_mask"]))
    c = np.asarray(model(ref["input_ids"], ref["attention_mask"], dropout_rng=jax.random.key(0)))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4, "dropout with a key must change the adapted output"


def test_unknown_lora_target_error():
    model, _ = load_pretrained(fixture("tiny-t5"))
    with pytest.raises(ValueError, match=r"q_proj.*available names"):
        apply_lora(model, LoraConfig(rank=2, target_modules=("q_proj",)))


def test_lora_config_rules_match_peft():
    cfg = LoraConfig(rank=4, alpha=8, target_modules=("self_attn.q_proj", "model.layers.1.mlp.up_proj",
                                                      "down_proj"),
                     layers_to_transform=0, exclude_modules="layers.0.mlp.down_proj",
                     rank_pattern={r"layers\.1\..*": 2, "q_proj": 6}, alpha_pattern={"up_proj": 3},
                     use_rslora=True)
    assert cfg.selects("model.layers.0.self_attn.q_proj")
    assert not cfg.selects("model.layers.1.self_attn.q_proj")  # layers_to_transform
    assert cfg.selects("model.layers.1.mlp.up_proj")  # a full path bypasses the layer filter
    assert not cfg.selects("model.layers.0.mlp.down_proj")  # excluded
    assert not cfg.selects("model.layers.0.self_attn.q_proj", modules_to_save=("self_attn",))
    assert cfg.rank_for("model.layers.1.self_attn.q_proj") == 2  # first matching key wins
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 6
    assert (cfg.alpha_for("model.layers.1.mlp.up_proj"), cfg.alpha_for("x.v_proj")) == (3.0, 8.0)
    assert cfg.scaling == 8 / 2  # alpha / sqrt(r)
    with pytest.raises(ValueError, match="layers_to_transform"):
        LoraConfig(target_regex=r".*q_proj", layers_to_transform=(0,))
    with pytest.raises(ValueError, match="layers_pattern needs layers_to_transform"):
        LoraConfig(layers_pattern="layers")
