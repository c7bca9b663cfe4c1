"""Mesh construction, name-based partition rules, divisibility fallback, FSDP, batch sharding.

Rule resolution only needs the mesh's axis sizes, so most tests use a ``jax.sharding.AbstractMesh``
of shape (4, 2) in this 1-device process; placing real arrays on 8 fake devices runs in a
subprocess (``XLA_FLAGS`` must be set before jax starts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxgrad.common import sharding as sh
from jaxgrad.models import LoraConfig, load_pretrained
from jaxgrad.models.layers import named_variables

from helpers import REPO, fixture

MESH_4x2 = jax.sharding.AbstractMesh((4, 2), ("data", "model"))
LLAMA_TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")


def specs_by_name(model, mesh, **kw) -> dict[str, P]:
    specs = sh.partition_specs(nnx.state(model), mesh, **kw)
    return {sh.path_name(p): s for p, s in
            jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]}


def test_make_mesh_axes_and_errors():
    mesh = sh.make_mesh(1, 1)
    assert mesh.axis_names == ("data", "model")
    assert tuple(mesh.axis_types) == (jax.sharding.AxisType.Auto,) * 2, mesh.axis_types
    assert dict(sh.make_mesh(-1, 1).shape) == {"data": jax.device_count(), "model": 1}
    with pytest.raises(ValueError, match="devices"):
        sh.make_mesh(2, 3)
    with pytest.raises(ValueError, match="model must be a positive int"):
        sh.make_mesh(1, 0)


def test_path_names_are_hugging_face_names():
    model, _ = load_pretrained(fixture("tiny-llama"), lora=LoraConfig(rank=4), with_tokenizer=False)
    names = {sh.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]}
    assert names == set(named_variables(model)), names ^ set(named_variables(model))


def test_llama_rules_with_divisibility_fallback():
    model, _ = load_pretrained(fixture("tiny-llama"),
                               lora=LoraConfig(rank=4, target_modules=LLAMA_TARGETS),
                               with_tokenizer=False)
    specs = specs_by_name(model, MESH_4x2)
    layer = "model.layers.0"
    want = {
        f"{layer}.self_attn.q_proj.weight": P("model"),  # column parallel, [out, in]
        f"{layer}.self_attn.k_proj.weight": P("model"),
        f"{layer}.mlp.up_proj.weight": P("model"),
        f"{layer}.self_attn.o_proj.weight": P(None, "model"),  # row parallel
        f"{layer}.mlp.down_proj.weight": P(None, "model"),
        f"{layer}.self_attn.q_proj.lora_B": P("model"),  # follows the output split
        f"{layer}.self_attn.q_proj.lora_A": P(),
        f"{layer}.self_attn.o_proj.lora_A": P(None, "model"),  # follows the input split
        f"{layer}.self_attn.o_proj.lora_B": P(),
        f"{layer}.input_layernorm.weight": P(),
        "model.embed_tokens.weight": P("model"),  # vocab 96 splits in 2
        "lm_head.weight": P("model"),
    }
    for name, spec in want.items():
        assert specs[name] == spec, f"{name}: got {specs[name]}, expected {spec}"
    odd = jax.sharding.AbstractMesh((1, 5), ("data", "model"))  # 5 divides nothing here
    assert all(s == P() for s in specs_by_name(model, odd).values()), (
        "dimensions not divisible by the model axis must fall back to replicated")


def test_t5_rules():
    model, _ = load_pretrained(fixture("tiny-t5"), with_tokenizer=False)
    specs = specs_by_name(model, MESH_4x2)
    attn = "encoder.block.0.layer.0.SelfAttention"
    assert specs[f"{attn}.q.weight"] == P("model")
    assert specs[f"{attn}.o.weight"] == P(None, "model")
    assert specs["decoder.block.1.layer.2.DenseReluDense.wi.weight"] == P("model")
    assert specs["decoder.block.1.layer.2.DenseReluDense.wo.weight"] == P(None, "model")
    assert specs["decoder.block.0.layer.1.EncDecAttention.k.weight"] == P("model")
    assert specs["shared.weight"] == P("model")
    assert specs[f"{attn}.relative_attention_bias.weight"] == P()


def test_fsdp_shards_largest_free_dimension_over_data():
    mesh = MESH_4x2
    assert sh.spec_for("model.layers.0.self_attn.q_proj.weight", (32, 32), mesh, fsdp=True) == \
        P("model", "data")
    assert sh.spec_for("model.layers.0.self_attn.o_proj.weight", (32, 64), mesh, fsdp=True) == \
        P("data", "model")
    assert sh.spec_for("model.embed_tokens.weight", (103, 32), mesh, fsdp=True) == P(None, "data")
    assert sh.spec_for("model.norm.weight", (32,), mesh, fsdp=True) == P("data")
    assert sh.spec_for("model.norm.weight", (6,), mesh, fsdp=True) == P()  # 4 does not divide 6
    assert sh.spec_for("x.weight", (8, 12), mesh, fsdp=True) == P(None, "data")  # largest wins
    assert sh.spec_for("x.weight", (12, 12), mesh, fsdp=True) == P("data")  # tie: first dim


def test_rules_from_config_and_bad_rules():
    rules = sh.rules_from_config([(r".*q_proj\.weight", (None, "model")), (".*", ())])
    assert sh.spec_for("a.q_proj.weight", (4, 8), MESH_4x2, rules) == P(None, "model")
    assert sh.spec_for("a.k_proj.weight", (4, 8), MESH_4x2, rules) == P()
    assert sh.rules_from_config(None) == sh.DEFAULT_RULES
    with pytest.raises(ValueError, match="not a mesh axis"):
        sh.spec_for("a", (4,), MESH_4x2, [(".*", P("tensor"))])
    with pytest.raises(ValueError, match="invalid regex"):
        sh.spec_for("a", (4,), MESH_4x2, [("(", P())])
    with pytest.raises(ValueError, match="3 dims"):
        sh.spec_for("a", (4, 4), MESH_4x2, [(".*", P(None, None, "model"))])


def test_arrays_placed_on_eight_devices(tmp_path):
    """State and batch shardings on a real (4, 2) mesh of fake CPU devices: shard shapes."""
    script = tmp_path / "place.py"
    script.write_text(textwrap.dedent(f"""
        import json, jax, numpy as np
        from flax import nnx
        from jaxgrad.common import sharding as sh
        from jaxgrad.models import LoraConfig, load_pretrained
        model, _ = load_pretrained({fixture('tiny-llama')!r}, lora=LoraConfig(rank=4),
                                   with_tokenizer=False)
        mesh = sh.make_mesh(4, 2)
        state = nnx.state(model)
        placed = jax.device_put(state, sh.state_shardings(state, mesh, fsdp=True))
        shards = {{sh.path_name(p): list(x.addressable_shards[0].data.shape)
                  for p, x in jax.tree_util.tree_flatten_with_path(placed)[0]}}
        batch = sh.shard_batch({{"input_ids": np.zeros((8, 5), np.int32)}}, mesh)["input_ids"]
        print(json.dumps({{"shards": shards, "batch": list(batch.shape),
                          "batch_shard": list(batch.addressable_shards[0].data.shape),
                          "devices": jax.device_count()}}))
    """))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    shards = out["shards"]
    # q_proj.weight [32, 32]: out split over model (2), in over data (4).
    assert shards["model.layers.0.self_attn.q_proj.weight"] == [16, 8]
    # k_proj.weight [16, 32] -> [8, 8]; lora_B [16, 4] -> out over model, 4 over data -> [8, 1].
    assert shards["model.layers.0.self_attn.k_proj.weight"] == [8, 8]
    assert shards["model.layers.0.self_attn.k_proj.lora_B"] == [8, 1]
    assert shards["model.norm.weight"] == [8]
    assert shards["model.embed_tokens.weight"] == [48, 8]  # vocab 96 / 2, hidden 32 / 4
    assert out["batch"] == [8, 5] and out["batch_shard"] == [2, 5]
