"""Helpers shared by the model tests (tests/models/, and the tests elsewhere that build a model
with a decoder start token other than pad): the committed tiny checkpoints against their
reference logits, tiny random transformers checkpoints written on the fly and compared with
torch, config.json edits, and the scan of transformers' modeling code for the keys it reads.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch  # the test extra installs torch (CPU) and transformers: references, never skipped
import transformers

from helpers import REPO, fixture
from jaxgrad.data import build_char_tokenizer
from jaxgrad.models import load_pretrained

# ---- the committed fixtures (tests/fixtures/tiny-*) against their reference logits --------------

ATOL = 1e-4  # float32 parity of a fixture with the torch logits in its reference.npz
DECODERS = ["tiny-llama", "tiny-qwen2"]
ENCDECS = ["tiny-t5", "tiny-flan-t5"]
ALL = DECODERS + ENCDECS


def reference(name):
    return dict(np.load(os.path.join(fixture(name), "reference.npz")))


def run(model, ref):
    """Our logits on the reference inputs, and the mask of positions that are real tokens."""
    if "decoder_input_ids" in ref:
        logits = model(ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"],
                       ref["decoder_attention_mask"])
        return np.asarray(logits), ref["decoder_attention_mask"] > 0
    return np.asarray(model(ref["input_ids"], ref["attention_mask"])), ref["attention_mask"] > 0


def max_err(a, b, mask):
    return float(np.abs(a - b)[mask].max())


def copy_fixture(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(fixture(name), dst)
    return dst


def edit_config(path, **changes):
    """Set (or, for ``None``, delete) keys of ``path``/config.json."""
    f = os.path.join(path, "config.json")
    cfg = json.load(open(f))
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    json.dump(cfg, open(f, "w"))


# ---- tiny random transformers checkpoints written by the tests -----------------------------------

CONFIG_ATOL = 1e-5  # float32; relative to the logit scale when that exceeds 1 (tol)
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}


def tol(ref, atol):
    return atol * max(1.0, float(np.abs(ref).max()))


def batch(width=12, vocab=64, seed=0):
    """A right-padded batch: a full row and a row with 4 padding positions."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (2, width)).astype(np.int64)
    mask = np.ones((2, width), np.int64)
    mask[1, width - 4:] = 0
    ids[1, width - 4:] = 0
    return ids, mask


def save_decoder(path, model_type="llama", nonzero_biases=True, seed=0, **kw):
    """Save a tiny random transformers decoder of ``model_type`` built from ``TINY | kw``."""
    torch.manual_seed(seed)
    cfg = getattr(transformers, CLASSES[model_type])(**{**TINY, **kw})
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and nonzero_biases:
                p.normal_(0, 0.5)
    model.save_pretrained(path)
    return str(path)


def torch_logits(path, inputs, seq2seq=False):
    cls = transformers.T5ForConditionalGeneration if seq2seq else transformers.AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()


def compare_decoder(path, width=12, atol=CONFIG_ATOL):
    """max |jaxgrad - torch| over real tokens; asserts it is below ``atol``."""
    ids, mask = batch(width)
    ref = torch_logits(path, dict(input_ids=ids, attention_mask=mask))
    model, _ = load_pretrained(path, with_tokenizer=False)
    ours = np.asarray(model(ids, mask))
    err = float(np.abs(ours - ref)[mask > 0].max())
    assert err < tol(ref, atol), f"{path}: max |jaxgrad - torch| = {err:.2e}"
    return model, ours, ref


def refused(path, *names):
    """load_pretrained(path) raises a ValueError naming config.json and each of ``names``."""
    with pytest.raises(ValueError) as info:
        load_pretrained(path, with_tokenizer=False)
    msg = str(info.value)
    assert "config.json" in msg, msg
    for name in names:
        assert name in msg, f"{name!r} not in: {msg}"
    return msg


# ---- the keys transformers' modeling code reads (each family's table must hold them) ------------

# Attribute reads the scan finds that are not config.json keys for these models: methods and
# class attributes, and masking helpers the model types here never call.
NOT_KEYS = {"default_theta", "get_text_config", "json", "per_layer_config",
            "standardize_rope_params", "validate_rope", "_rope_type_labels",
            "attention_chunk_size"}  # create_chunked_causal_mask (Llama 4), not called here
READ = re.compile(r'config\.([A-Za-z]\w*)|(?:get|has)attr\((?:self\.)?config, "(\w+)"'
                  r'|(?:get|has)attr\(self, "(\w+)"')


# ---- a T5 whose decoder start token is not its pad id (issue 12, kind 6) -------------------------

START = 7  # decoder start token, distinct from pad (0) and eos (2)
START_EXAMPLES = [{"example_id": f"s/{i}", "source": "s", "prompt": p, "completion": c,
                   "answer": None}
                  for i, (p, c) in enumerate([("translate: cat", "chat"),
                                              ("translate: dog", "chien"), ("say: a b", "ab")])]


def save_t5_start7(d):
    """(directory, torch model): a tiny random T5 with decoder_start_token_id=7 saved in ``d``
    (the session fixture ``t5_start7`` of tests/conftest.py)."""
    tok = build_char_tokenizer()  # pad 0, bos 1, eos 2
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                relative_attention_max_distance=12, feed_forward_proj="gated-gelu",
                                tie_word_embeddings=False, dropout_rate=0.0, pad_token_id=0,
                                eos_token_id=2, decoder_start_token_id=START)
    m = transformers.T5ForConditionalGeneration(cfg).eval()
    m.save_pretrained(d)
    return str(d), m


# Short question-answer examples with closed answers (choice accuracy, representations).
QA_EXAMPLES = [
    {"source": "qa", "prompt": "Q: Is ice cold?\nA: ", "completion": "Yes. It is frozen.",
     "answer": "Yes"},
    {"source": "qa", "prompt": "Q: Do fish fly?\nA: ", "completion": "No. They swim.",
     "answer": "No"},
    {"source": "qa", "prompt": "Q: Is the sun hot and bright in summer?\nA: ",
     "completion": "Yes. Very.", "answer": "Yes"},
]


def llama_and_torch_reference():
    """``(model, tokenizer, torch model)``: the tiny-llama fixture in jaxgrad and in transformers
    (float32, eval mode), for parity checks."""
    model, tok = load_pretrained(fixture("tiny-llama"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(fixture("tiny-llama"),
                                                            torch_dtype=torch.float32).eval()
    return model, tok, ref


def token_ids(tok, text):
    """``text``'s token ids without special tokens."""
    return tok(text, add_special_tokens=False)["input_ids"]


def torch_causal_logits(model, ids, mask) -> np.ndarray:
    """A transformers causal LM's float32 logits ``[B, L, V]`` for ``ids`` and ``mask``."""
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def doc_key_table(family: str) -> dict[str, str]:
    """``docs/models/<family>.md``'s table of config.json keys, ``{key: rule}`` (the section
    "## config.json keys" up to the next section); a key listed twice fails."""
    with open(os.path.join(REPO, "docs", "models", f"{family}.md")) as f:
        text = f.read()
    section = text.split("## config.json keys", 1)[1].split("\n## ", 1)[0]
    doc = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`([^`]+)`\s*\|\s*([^|]+?)\s*\|", line)
        if m:
            assert m.group(1) not in doc, f"{m.group(1)} listed twice"
            doc[m.group(1)] = m.group(2)
    return doc
