"""Projected per-sample gradients against gradients taken one example at a time, projected densely."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from jaxgrad.data.tokenizer import build_char_tokenizer
from jaxgrad.models import load_peft_adapter, load_pretrained
from jaxgrad.gradients.compute import compute_gradient_store
from jaxgrad.gradients.per_sample import num_trainable, per_sample_projected_grads
from jaxgrad.gradients.projection import Projector

from helpers import TESTS, fixture, fixture_batch
from helpers.gradients import one_at_a_time

K = 16


def adapted(name):
    """A fixture model with its (nonzero) peft adapter, so LoRA gradients are all informative."""
    model, _ = load_pretrained(fixture(name))
    load_peft_adapter(model, os.path.join(fixture(name), "peft_adapter"))
    return model


@pytest.mark.parametrize("name,output_fn", [("tiny-llama", "logit_odds"), ("tiny-t5", "token_ce"),
                                            ("tiny-qwen2", "token_ce"), ("tiny-flan-t5", "logit_odds")])
def test_vmap_projected_grads_equal_one_at_a_time(name, output_fn):
    model = adapted(name)
    batch = fixture_batch(name)
    proj = Projector(seed=7, dim=num_trainable(model), k=K)
    res = per_sample_projected_grads(model, batch, proj, output_fn, chunk_size=2)
    grads, vals = one_at_a_time(model, batch, output_fn)
    expected = grads @ np.asarray(proj.dense())
    assert res.feats.shape == (3, K)
    np.testing.assert_allclose(np.asarray(res.f), vals, rtol=1e-5, atol=1e-6)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(res.feats), expected, atol=1e-4 * scale,
                               err_msg="vmap(grad)+projection differs from per-example grad @ dense P")


def test_full_finetune_mode_differentiates_every_parameter():
    model, _ = load_pretrained(fixture("tiny-qwen2"))
    batch = fixture_batch("tiny-qwen2")
    dim = num_trainable(model, full_finetune=True)
    assert dim == sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    proj = Projector(seed=1, dim=dim, k=K)
    res = per_sample_projected_grads(model, batch, proj, "token_ce", full_finetune=True, chunk_size=3)
    grads, _ = one_at_a_time(model, batch, "token_ce", full_finetune=True)
    expected = grads @ np.asarray(proj.dense())
    np.testing.assert_allclose(np.asarray(res.feats), expected, atol=1e-4 * np.abs(expected).max())


def test_lora_mode_without_adapters_is_refused_by_name(tmp_path):
    """LoRA mode (full_finetune=False) on a model without adapters: a ValueError naming the
    setting, never a silent fall-back to differentiating every parameter."""
    model, _ = load_pretrained(fixture("tiny-qwen2"))
    tokenizer = build_char_tokenizer()  # ids of "a", "b" and the specials < the vocabulary's 96
    batch = fixture_batch("tiny-qwen2")
    dim = num_trainable(model, full_finetune=True)
    proj = Projector(seed=1, dim=dim, k=K)
    want = r"no LoRA adapters.*train\.full_finetune=True.*lora\.rank"
    with pytest.raises(ValueError, match=want):
        num_trainable(model)
    with pytest.raises(ValueError, match=want):
        per_sample_projected_grads(model, batch, proj, "token_ce")
    examples = [{"prompt": "a", "completion": "b", "source": "s", "example_id": "s/0"}]
    with pytest.raises(ValueError, match=want):
        compute_gradient_store(model, examples, tokenizer, proj, str(tmp_path / "g"),
                               split="train", sources=["s"])
    assert not os.path.exists(tmp_path / "g")
    store = compute_gradient_store(model, examples, tokenizer, proj, str(tmp_path / "g"),
                                   split="train", sources=["s"], full_finetune=True, max_length=16)
    assert store.num_examples == 1


def test_independent_of_chunk_and_batch_size():
    model = adapted("tiny-llama")
    batch = fixture_batch("tiny-llama")
    proj = Projector(seed=3, dim=num_trainable(model), k=K)
    whole = per_sample_projected_grads(model, batch, proj, chunk_size=3)
    for chunk in (1, 2):
        other = per_sample_projected_grads(model, batch, proj, chunk_size=chunk)
        np.testing.assert_allclose(np.asarray(other.feats), np.asarray(whole.feats), rtol=1e-5, atol=1e-6)
    # batch size: each example alone gives the same row as inside the batch
    for i in range(3):
        single = {k: v[i : i + 1] for k, v in batch.items()}
        row = per_sample_projected_grads(model, single, proj, chunk_size=1)
        np.testing.assert_allclose(np.asarray(row.feats[0]), np.asarray(whole.feats[i]), rtol=1e-5, atol=1e-6)


def test_projector_dim_mismatch_error():
    model = adapted("tiny-llama")
    with pytest.raises(ValueError, match="trainable parameters"):
        per_sample_projected_grads(model, fixture_batch("tiny-llama"), Projector(seed=0, dim=10, k=4))


def test_eight_fake_devices_match_one_device(tmp_path):
    """Sharding the examples over a (4, 2) mesh's data axis changes nothing (own process)."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {TESTS!r})
        import numpy as np, jax
        from jaxgrad.models import load_pretrained, load_peft_adapter
        from jaxgrad.gradients.per_sample import per_sample_projected_grads, num_trainable
        from jaxgrad.gradients.projection import Projector
        from helpers import fixture, fixture_batch
        model, _ = load_pretrained(fixture("tiny-llama"))
        load_peft_adapter(model, os.path.join(fixture("tiny-llama"), "peft_adapter"))
        batch = fixture_batch("tiny-llama")
        batch = {{k: np.concatenate([v, v, v[:2]]) for k, v in batch.items()}}  # 8 examples
        proj = Projector(seed=3, dim=num_trainable(model), k=16)
        mesh = None
        if len(jax.devices()) == 8:
            mesh = jax.make_mesh((4, 2), ("data", "model"),
                                 axis_types=(jax.sharding.AxisType.Auto,) * 2)
        res = per_sample_projected_grads(model, batch, proj, chunk_size=4, mesh=mesh)
        np.save(sys.argv[1], np.asarray(res.feats))
        print(len(jax.devices()))
    """)
    path = tmp_path / "run.py"
    path.write_text(script)
    outs = {}
    for n in (1, 8):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
        out = tmp_path / f"feats{n}.npy"
        proc = subprocess.run([sys.executable, str(path), str(out)], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip().endswith(str(n))
        outs[n] = np.load(out)
    np.testing.assert_allclose(outs[8], outs[1], rtol=1e-5, atol=1e-6)


def test_leaf_groups_give_same_projection(monkeypatch):
    """Projecting leaves in several concatenated groups equals one group (projection is linear)."""
    import jaxgrad.gradients.per_sample as ps

    model = adapted("tiny-qwen2")
    batch = fixture_batch("tiny-qwen2")
    proj = Projector(seed=2, dim=num_trainable(model), k=K)
    one = per_sample_projected_grads(model, batch, proj, chunk_size=3)
    monkeypatch.setattr(ps, "GROUP_ENTRIES", 200)  # the LoRA leaves here hold 64-256 entries
    assert len(ps._leaf_groups([64, 128, 256, 64])) == 3
    jax.clear_caches()
    many = per_sample_projected_grads(model, batch, proj, chunk_size=3)
    np.testing.assert_allclose(np.asarray(many.feats), np.asarray(one.feats), rtol=1e-5, atol=1e-6)
