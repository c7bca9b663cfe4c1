"""PEFT adapter_config.json fields: each one is honoured exactly or refused by name.

The adapters and their torch+peft logits come from
tests/fixtures/peft-configs/make_peft_config_fixtures.py (tiny random Llama, Qwen2 and T5; peft
``save_pretrained`` with alpha_pattern, rank_pattern, modules_to_save, layers_to_transform /
layers_pattern, exclude_modules, regex and dotted targets, all-linear, rsLoRA, bias, ...; the
reference logits are peft's own reload of each saved adapter). Refusals are checked on those
fixtures and on copies of a fixture whose adapter_config.json is edited here. The committed tiny
fixtures' own adapters (tests/fixtures/*/peft_adapter) are checked against torch+peft too, and
exported then imported again.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from helpers import fixture
from helpers.models import ALL, ATOL, max_err, reference, run
from jaxgrad.models import (LoraConfig, apply_lora, load_peft_adapter, load_pretrained, lora_state,
                            num_params, save_peft_adapter, split_lora)
from jaxgrad.models.lora import linear_modules
from jaxgrad.models.peft import lora_config_of, read_peft_config


HERE = fixture("peft-configs")
CASES = json.load(open(os.path.join(HERE, "cases.json")))
HONOURED = sorted(c for c, info in CASES.items() if info["refused_by"] is None)
REFUSED = sorted(c for c, info in CASES.items() if info["refused_by"] is not None)
REF = dict(np.load(os.path.join(HERE, "reference.npz")))


def base_model(base):
    return load_pretrained(os.path.join(HERE, base), with_tokenizer=False)[0]


def logits(model, base):
    """Our float32 logits on the fixture inputs, and the mask of real (non-padding) positions."""
    if base == "t5":
        out = model(REF["t5_input_ids"], REF["t5_attention_mask"], REF["t5_decoder_input_ids"],
                    REF["t5_decoder_attention_mask"])
        return np.asarray(out), REF["t5_decoder_attention_mask"] > 0
    out = model(REF[f"{base}_input_ids"], REF[f"{base}_attention_mask"])
    return np.asarray(out), REF[f"{base}_attention_mask"] > 0


def err_vs(ours, ref, mask):
    """max |ours - ref| on real positions, relative to the logits' scale when that exceeds 1."""
    return float(np.abs(ours - ref)[mask].max()) / max(1.0, float(np.abs(ref).max()))


def loaded(case):
    model = base_model(CASES[case]["base"])
    load_peft_adapter(model, os.path.join(HERE, case))
    return model


def edited_copy(tmp_path, case="alpha_pattern_name", **fields):
    """A copy of a fixture adapter with ``fields`` set in its adapter_config.json."""
    d = tmp_path / case
    shutil.copytree(os.path.join(HERE, case), d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(fields)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("case", HONOURED)
def test_peft_adapter_logits_match_torch_peft(case):
    base = CASES[case]["base"]
    ours, mask = logits(loaded(case), base)
    assert err_vs(REF[f"base_{base}"], REF[case], mask) > 1e-3, "the fixture adapter should matter"
    err = err_vs(ours, REF[case], mask)
    assert err < 1e-5, f"{case}: max |jaxgrad - torch+peft| = {err:.2e} (relative to scale)"


@pytest.mark.parametrize("case", HONOURED)
def test_export_reloads_identically(case, tmp_path):
    """save_peft_adapter writes peft's key names and a config that selects the same layers with
    the same per-module rank, alpha and scaling (test_export_loads_back_in_torch_peft checks the
    same export through peft itself)."""
    model = loaded(case)
    out = tmp_path / "export"
    save_peft_adapter(model, out)
    original = set(load_file(os.path.join(HERE, case, "adapter_model.safetensors")))
    assert set(load_file(str(out / "adapter_model.safetensors"))) == original
    again = base_model(CASES[case]["base"])
    load_peft_adapter(again, out)
    a, b = linear_modules(model), linear_modules(again)
    adapted = sorted(p for p, lin in a.items() if lin.lora_A is not None)
    assert adapted == sorted(p for p, lin in b.items() if lin.lora_A is not None)
    for p in adapted:
        assert (a[p].lora_A.shape, a[p].lora_scaling) == (b[p].lora_A.shape, b[p].lora_scaling), p
    ours, mask = logits(again, CASES[case]["base"])
    assert err_vs(ours, REF[case], mask) < 1e-5


@pytest.mark.parametrize("case", [c for c in HONOURED if c != "null_targets"])
def test_apply_lora_with_read_config_selects_what_peft_did(case):
    """Creating adapters from the file's config gives peft's layers and ranks (file tensors)."""
    model = apply_lora(base_model(CASES[case]["base"]), read_peft_config(os.path.join(HERE, case)))
    tensors = {k: v for k, v in load_file(os.path.join(HERE, case, "adapter_model.safetensors")).items()
               if "lora_" in k}
    ours = {f"base_model.model.{p}.lora_{ab}.weight": getattr(lin, f"lora_{ab}").shape
            for p, lin in linear_modules(model).items() if lin.lora_A is not None for ab in "AB"}
    assert ours == {k: v.shape for k, v in tensors.items()}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_peft_adapters_name_the_field(case):
    model = base_model(CASES[case]["base"])
    with pytest.raises(ValueError) as info:
        load_peft_adapter(model, os.path.join(HERE, case))
    msg = str(info.value)
    assert CASES[case]["refused_by"] in msg and "adapter_config.json" in msg, msg
    assert num_params(lora_state(model)) == 0, "a refused adapter must leave the model unchanged"


@pytest.mark.parametrize("field, value", [
    ("use_dora", True), ("lora_bias", True), ("layer_replication", [[0, 2], [1, 2]]),
    ("megatron_config", {"tensor_model_parallel_size": 2}), ("trainable_token_indices", [3, 4]),
    ("target_parameters", ["mlp.experts.gate_up_proj"]), ("alora_invocation_tokens", [7, 8]),
    ("use_qalora", True), ("use_bdlora", {"nblocks": 2}), ("arrow_config", {"top_k": 2}),
    ("kasa_config", {"a": 1}), ("velora_config", {"a": 1}), ("monteclora_config", {"a": 1}),
    ("init_lora_weights", "pissa"), ("init_lora_weights", "olora"), ("init_lora_weights", "loftq"),
    ("some_future_field", {"scale": 2.0}), ("bias", "some_bias"), ("peft_type", "IA3"),
])
def test_refused_fields_are_named(field, value, tmp_path):
    d = edited_copy(tmp_path, **{field: value})
    model = base_model("llama")
    with pytest.raises(ValueError) as info:
        load_peft_adapter(model, d)
    msg = str(info.value)
    assert field.split("_config")[0] in msg and str(d / "adapter_config.json") in msg, msg
    assert num_params(lora_state(model)) == 0


def test_metadata_and_unset_unknown_fields_are_accepted(tmp_path):
    d = edited_copy(tmp_path, task_type="CAUSAL_LM", base_model_name_or_path="somewhere/else",
                    revision="main", inference_mode=False, peft_version="9.9.9",
                    some_future_flag=False, some_future_config=None, init_lora_weights="gaussian",
                    loftq_config={"loftq_bits": 4}, fan_in_fan_out=True)
    model = base_model("llama")
    load_peft_adapter(model, d)
    ours, mask = logits(model, "llama")
    assert err_vs(ours, REF["alpha_pattern_name"], mask) < 1e-5


def test_tensor_that_no_field_explains_is_refused(tmp_path):
    d = edited_copy(tmp_path)
    tensors = load_file(str(d / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.weight"] = np.zeros((64, 32), np.float32)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"modules_to_save=\[\] nor bias='none'.*lm_head\.weight"):
        load_peft_adapter(base_model("llama"), d)


def test_modules_to_save_of_a_tied_embedding_is_refused(tmp_path):
    """A tied Llama (one table for input and output) cannot hold peft's untied copy."""
    d = edited_copy(tmp_path, modules_to_save=["embed_tokens"])
    tensors = load_file(str(d / "adapter_model.safetensors"))
    tensors["base_model.model.model.embed_tokens.weight"] = np.ones((96, 32), np.float32)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    model = load_pretrained(fixture("tiny-qwen2"), with_tokenizer=False)[0]  # tied, hidden 32
    targets = json.loads((d / "adapter_config.json").read_text())["target_modules"]
    assert model.lm_head is None and targets
    with pytest.raises(ValueError, match=r"modules_to_save.*ties its output head"):
        load_peft_adapter(model, d)


def test_mismatched_selection_names_the_fields_and_leaves_model_unchanged(tmp_path):
    d = edited_copy(tmp_path, layers_to_transform=[1])
    model = base_model("llama")
    with pytest.raises(ValueError, match=r"layers_to_transform.*unexpected: \['model\.layers\.0"):
        load_peft_adapter(model, d)
    assert num_params(lora_state(model)) == 0


def test_existing_adapters_keep_dropout_and_take_the_file_alphas():
    model = base_model("llama")
    apply_lora(model, LoraConfig(rank=4, alpha=1.0, dropout=0.5, target_modules="q_proj,v_proj"))
    load_peft_adapter(model, os.path.join(HERE, "alpha_pattern_name"))
    v = model.model.layers[0].self_attn.v_proj
    assert (v.lora_scaling, v.lora_dropout) == (64 / 4, 0.5)
    ours, mask = logits(model, "llama")
    assert err_vs(ours, REF["alpha_pattern_name"], mask) < 1e-5


def test_lora_config_of_records_per_module_rank_and_alpha():
    model = base_model("t5")
    cfg = LoraConfig(rank=4, alpha=8, target_modules=("q", "v"), layers_to_transform=[1],
                     layers_pattern="block", rank_pattern={"EncDecAttention.v": 2},
                     alpha_pattern={r"decoder\..*\.q": 5})
    apply_lora(model, cfg)
    again = apply_lora(base_model("t5"), lora_config_of(model))
    for (p, a), (q, b) in zip(sorted(linear_modules(model).items()),
                              sorted(linear_modules(again).items())):
        assert p == q and (a.lora_A is None) == (b.lora_A is None)
        if a.lora_A is not None:
            assert (a.lora_A.shape, a.lora_scaling) == (b.lora_A.shape, b.lora_scaling), p
    assert model.decoder.block[1].layer[1].EncDecAttention.v.lora_A.shape == (2, 32)
    assert model.encoder.block[0].layer[0].SelfAttention.q.lora_A is None


def test_modules_to_save_weights_are_base_params_kept_through_split():
    model = loaded("modules_to_save")
    _, adapters, _ = split_lora(model)
    names = {".".join(map(str, k)) for k, _ in adapters.flat_state()}
    assert names and all("lora_" in n for n in names), "modules_to_save weights are not trained"
    assert model.peft_base_tensors.modules_to_save == ("lm_head", "norm")


@pytest.mark.parametrize("case", HONOURED)
def test_export_loads_back_in_torch_peft(case, tmp_path):
    """Our export, read by ``peft.PeftModel.from_pretrained`` on the torch base, gives peft's
    reference logits (per-module rank/alpha, modules_to_save and bias tensors included)."""
    import sys

    import peft  # the test extra installs peft and torch: this test never skips
    import torch
    sys.path.insert(0, HERE)
    try:
        from make_peft_config_fixtures import BASES
    finally:
        sys.path.remove(HERE)
    base = CASES[case]["base"]
    model = base_model(base)
    load_peft_adapter(model, os.path.join(HERE, case))
    save_peft_adapter(model, str(tmp_path))
    torch_base = BASES[base][0].from_pretrained(os.path.join(HERE, base)).eval()
    pm = peft.PeftModel.from_pretrained(torch_base, str(tmp_path)).eval()
    with torch.no_grad():
        if base == "t5":
            out = pm(input_ids=torch.tensor(REF["t5_input_ids"], dtype=torch.long),
                     attention_mask=torch.tensor(REF["t5_attention_mask"], dtype=torch.long),
                     decoder_input_ids=torch.tensor(REF["t5_decoder_input_ids"], dtype=torch.long),
                     decoder_attention_mask=torch.tensor(REF["t5_decoder_attention_mask"],
                                                         dtype=torch.long)).logits
            mask = REF["t5_decoder_attention_mask"] > 0
        else:
            out = pm(input_ids=torch.tensor(REF[f"{base}_input_ids"], dtype=torch.long),
                     attention_mask=torch.tensor(REF[f"{base}_attention_mask"],
                                                 dtype=torch.long)).logits
            mask = REF[f"{base}_attention_mask"] > 0
    err = err_vs(out.float().numpy(), REF[case], mask)
    assert err < 1e-5, f"{case}: our export loaded in torch+peft, max |diff| = {err:.2e}"


@pytest.mark.parametrize("name", ALL)
def test_peft_adapter_matches_torch_peft(name):
    """A nonzero adapter trained/saved by peft gives the same logits in our model as in torch."""
    model, _ = load_pretrained(fixture(name))
    load_peft_adapter(model, os.path.join(fixture(name), "peft_adapter"))
    ref = reference(name)
    ours, mask = run(model, ref)
    assert max_err(ref["peft_logits"], ref["logits"], mask) > 1e-2, "fixture adapter should matter"
    err = max_err(ours, ref["peft_logits"], mask)
    assert err < ATOL, f"{name}: with the peft adapter, max |ours - torch+peft| = {err:.2e}"


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-t5"])
def test_peft_export_then_import_is_exact(name, tmp_path):
    model, _ = load_pretrained(fixture(name))
    load_peft_adapter(model, os.path.join(fixture(name), "peft_adapter"))
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=fixture(name))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    original = set(load_file(os.path.join(fixture(name), "peft_adapter", "adapter_model.safetensors")))
    assert keys == original, "exported key names must be PEFT's, identical to peft's own save"
    fresh, _ = load_pretrained(fixture(name))
    load_peft_adapter(fresh, tmp_path / "adapter")
    a = jax.tree_util.tree_leaves(lora_state(model))
    b = jax.tree_util.tree_leaves(lora_state(fresh))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
