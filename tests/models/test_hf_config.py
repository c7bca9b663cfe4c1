"""jaxgrad.models.hf_config: each family's table of config.json keys agrees with transformers'
config classes, with the keys its modeling code reads and with docs/config_fields.md (issue 12,
kind 1); one dtype rule for every entry point (kind 3: float32 / bfloat16, the rest refused by
name); an activation that is not a name is refused, and a refusal names the file where the
family's keys are listed."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch  # the test extra installs torch (CPU) and transformers: references, never skipped
import transformers

from helpers import REPO, fixture
from helpers.models import CLASSES, NOT_KEYS, READ
from jaxgrad.models import (LlamaConfig, T5Config, config_from_hf, hf_config, llama as llama_lib,
                            load_pretrained, t5 as t5_lib)


def _table(model_type):
    return t5_lib.HF_FIELDS if model_type == "t5" else llama_lib.HF_FIELDS[model_type]


def _transformers_class(model_type):
    return transformers.T5Config if model_type == "t5" else getattr(transformers, CLASSES[model_type])


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "t5"])
def test_table_covers_every_transformers_config_field_with_its_default(model_type):
    table = _table(model_type)
    for f in dataclasses.fields(_transformers_class(model_type)):
        assert f.name in table, f"{model_type}: transformers field {f.name!r} missing from HF_FIELDS"
        default = f.default if f.default is not dataclasses.MISSING else None
        assert table[f.name][0] == default, \
            f"{model_type}.{f.name}: table default {table[f.name][0]!r} vs transformers {default!r}"
    assert all(rule in hf_config.RULES for _, rule in table.values())


_NOT_KEYS_T5 = NOT_KEYS | {"num_labels",  # classification / QA heads only
                            "sliding_window", "layer_types"}  # masks T5Stack never builds


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "t5"])
def test_every_key_transformers_reads_is_in_the_table(model_type):
    """The modeling code of the installed transformers reads no config attribute the table lacks:
    a key outside the table has no effect in transformers either (docs/config_fields.md)."""
    root = os.path.dirname(transformers.__file__)
    files = [f"models/{model_type}/modeling_{model_type}.py", "masking_utils.py"]
    if model_type != "t5":
        files.append("modeling_rope_utils.py")
    read = set()
    for f in files:
        for m in READ.finditer(open(os.path.join(root, f)).read()):
            read.add(next(g for g in m.groups() if g))
    ignored = _NOT_KEYS_T5 if model_type == "t5" else NOT_KEYS
    unknown = sorted(read - set(_table(model_type)) - ignored)
    assert not unknown, f"{model_type}: transformers reads {unknown}; add them to HF_FIELDS and the doc"


def _doc_rules():
    """{model_type: {key: rule}} from docs/config_fields.md's tables."""
    text = open(os.path.join(REPO, "docs", "config_fields.md")).read()
    out = {t: {} for t in ("llama", "mistral", "qwen2", "t5")}
    section = None
    for line in text.splitlines():
        if line.startswith("## "):
            section = line
        m = re.match(r"\|\s*`([^`]+)`\s*\|(.*)", line)
        if not m or section is None:
            continue
        key, cells = m.group(1), [c.strip() for c in m.group(2).split("|")]
        if "Every model type" in section:
            for t in out:
                out[t][key] = cells[0]
        elif "Llama family" in section:
            for t, cell in zip(("llama", "mistral", "qwen2"), cells[:3]):
                if cell != "—":
                    out[t][key] = cell
        elif "T5" in section:
            out["t5"][key] = cells[0]
    return out


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "t5"])
def test_doc_lists_every_key_with_the_code_rule(model_type):
    doc = _doc_rules()[model_type]
    code = {k: rule for k, (_, rule) in _table(model_type).items()}
    assert doc == code, (f"{model_type}: doc-only {sorted(set(doc) - set(code))}, code-only "
                         f"{sorted(set(code) - set(doc))}, differing "
                         f"{sorted(k for k in set(doc) & set(code) if doc[k] != code[k])}")


BAD_DTYPES = ["float16", jnp.float16, np.float16, "float64", np.float64, "int8", jnp.int32,
              "fp32", None]


def _bad_ids():
    return ["float16", "jnp.float16", "np.float16", "float64", "np.float64", "int8", "jnp.int32",
            "fp32", "None"]


@pytest.mark.parametrize("bad", BAD_DTYPES, ids=_bad_ids())
def test_unsupported_dtypes_refused_by_every_entry_point(bad):
    hf = json.load(open(os.path.join(fixture("tiny-t5"), "config.json")))
    small = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=2, head_dim=4)
    calls = {
        "load_pretrained(dtype)": lambda: load_pretrained(fixture("tiny-t5"), dtype=bad),
        "config_from_hf(dtype)": lambda: config_from_hf(hf, dtype=bad),
        "config_from_hf(param_dtype)": lambda: config_from_hf(hf, param_dtype=bad),
        "LlamaConfig(dtype)": lambda: LlamaConfig(**small, dtype=bad),
        "T5Config(param_dtype)": lambda: T5Config(vocab_size=8, d_model=8, d_kv=4, d_ff=8,
                                                  num_layers=1, num_decoder_layers=1,
                                                  num_heads=2, param_dtype=bad),
    }
    if bad is not None:  # param_dtype=None means the default, float32
        calls["load_pretrained(param_dtype)"] = lambda: load_pretrained(fixture("tiny-llama"),
                                                                        param_dtype=bad)
    for name, call in calls.items():
        with pytest.raises(ValueError) as info:
            call()
        msg = str(info.value)
        what = "param_dtype" if "param_dtype" in name else "dtype"
        assert f"{what}={bad!r}" in msg, f"{name}: {msg}"


def test_torch_dtype_refused():
    with pytest.raises(ValueError, match=r"dtype=torch.float16"):
        load_pretrained(fixture("tiny-llama"), dtype=torch.float16)


@pytest.mark.parametrize("good, want", [("bfloat16", jnp.bfloat16), (jnp.bfloat16, jnp.bfloat16),
                                        (np.dtype("float32"), jnp.float32),
                                        (jnp.dtype("bfloat16"), jnp.bfloat16),
                                        (np.float32, jnp.float32)])
def test_supported_dtype_spellings(good, want):
    cfg = config_from_hf(json.load(open(os.path.join(fixture("tiny-llama"), "config.json"))),
                         dtype=good, param_dtype=good)
    assert cfg.dtype is want and cfg.param_dtype is want


@pytest.mark.parametrize("model_type,key", [("llama", "hidden_act"), ("t5", "dense_act_fn")])
def test_an_activation_that_is_not_a_name_is_refused_by_name(model_type, key):
    from jaxgrad.models.hub import config_from_hf

    cfg = ({"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4}
           if model_type == "llama" else
           {"model_type": "t5", "vocab_size": 64, "d_model": 32, "d_kv": 8, "d_ff": 64,
            "num_layers": 2, "num_heads": 4})
    cfg[key] = ["silu"]
    with pytest.raises(ValueError, match=f"{key}=\\['silu'\\] is not supported"):
        config_from_hf(cfg)


@pytest.mark.parametrize("model_type,doc", [("llama", "docs/config_fields.md"),
                                            ("gpt2", "docs/models/gpt2.md"),
                                            ("gpt_neox", "docs/models/gpt_neox.md"),
                                            ("gemma3_text", "docs/models/gemma3.md")])
def test_refusals_point_to_the_familys_table_of_keys(model_type, doc):
    """A refused config.json key names the file where the family's keys are listed."""
    from jaxgrad.models import config_from_hf

    with pytest.raises(ValueError, match=rf"x/config\.json: is_causal=False .*\(see {doc}\)"):
        config_from_hf({"model_type": model_type, "is_causal": False}, source="x/config.json")
    assert os.path.isfile(os.path.join(REPO, doc))
